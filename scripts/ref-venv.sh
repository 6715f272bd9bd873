#!/usr/bin/env bash
# Create/refresh the Python 3.13 venv holding the reference implementation
# (asap-protocol) used only by the interop tests. Idempotent and quiet.
#
#   scripts/ref-venv.sh            # ensure .venv-ref exists and is complete
#   REF_VENV=/path scripts/ref-venv.sh
#   FORCE=1 scripts/ref-venv.sh    # rebuild from scratch
#
# On success prints the venv's python path on stdout (one line); errors go to stderr.
set -euo pipefail

REF_PKG="asap-protocol==2.5.10"
PY_VERSION="3.13.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REF_VENV:-$ROOT/.venv-ref}"
MARKER="$VENV/.asap-ref-complete"

die() { echo "ref-venv.sh: error: $*" >&2; exit 1; }

is_complete() {
    [[ -f "$MARKER" ]] \
        && [[ "$(cat "$MARKER")" == "$REF_PKG" ]] \
        && [[ -x "$VENV/bin/python" ]] \
        && "$VENV/bin/python" -c '
import importlib.metadata as m, importlib.util as u, sys
ok = m.version("asap-protocol") == sys.argv[1] and u.find_spec("asap") is not None
sys.exit(0 if ok else 1)' "${REF_PKG#*==}" >/dev/null 2>&1
}

if [[ "${FORCE:-0}" != "1" ]] && is_complete; then
    echo "$VENV/bin/python"
    exit 0
fi

# Locate a Python 3.13 interpreter.
find_py313() {
    local c
    export PYENV_ROOT="${PYENV_ROOT:-/root/.pyenv}"
    if [[ -d "$PYENV_ROOT" ]]; then
        export PATH="$PYENV_ROOT/shims:$PYENV_ROOT/bin:$PATH"
    fi
    for c in \
        "$PYENV_ROOT/versions/$PY_VERSION/bin/python3.13" \
        "$(PYENV_VERSION=$PY_VERSION command -v python3.13 2>/dev/null || true)" \
        "$(command -v python3.13 2>/dev/null || true)"; do
        [[ -n "$c" && -x "$c" ]] || continue
        if PYENV_VERSION=$PY_VERSION "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info[:2] == (3, 13) else 1)' >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

PY313="$(find_py313)" || die "Python 3.13 not found (looked in \$PYENV_ROOT/versions/$PY_VERSION and PATH). Install it, e.g. 'pyenv install $PY_VERSION'."

rm -rf "$VENV"
PYENV_VERSION=$PY_VERSION "$PY313" -m venv "$VENV" || die "could not create venv at $VENV with $PY313"

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$REF_PKG" >"$LOG" 2>&1; then
    cat "$LOG" >&2
    die "pip install $REF_PKG failed"
fi
# Importing the reference logs to stdout/stderr; keep it quiet unless it fails.
if ! "$VENV/bin/python" -P -W ignore -c 'import asap.transport.client, asap.models.envelope' >"$LOG" 2>&1; then
    cat "$LOG" >&2
    die "$REF_PKG installed but 'import asap.transport.client' failed"
fi
echo "$REF_PKG" >"$MARKER"
echo "$VENV/bin/python"

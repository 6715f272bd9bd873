"""bench/results.md from the results of one bench/run.py run (the dict it writes to
bench/results.json): tables, feature cost, memory and the targets of the performance issue.

Everything here is computed from that dict; nothing is hand-written. Standard library only.
"""

from __future__ import annotations

import statistics
from typing import Any

from common import PROD_FEATURES, SINGLE

GOAL_LEVEL = 16  # the figures are at 16 connections
ERROR_LEVEL = 64  # "no errors at c64"
BARE_SHARE, REFERENCE_TIMES, P99_MS, PROD_COST = 0.5, 15.0, 5.0, 0.30
FULL_MEMORY_RUN = 100_000
UNSTEADY = 0.25
"""Runs of one target at one level whose req/s span more than this share of their median
are unsteady: the machine changed speed during the benchmark. Targets judged on them say so."""

Level = dict[str, Any]


def level(res: dict[str, Any], name: str, c: int) -> Level | None:
    """Medians of one target at one concurrency, None if not measured."""
    for t in res["targets"]:
        if t["name"] == name:
            return next((x for x in t["results"] if x["concurrency"] == c), None)
    return None


def percent(share: float, bound: float) -> str:
    """``share`` as a whole percent, or to a tenth where rounding would make it read as the
    target's own ``bound`` (49.8% against "at least 50%" must not show as 50%, not met)."""
    whole = f"{share:.0%}"
    return f"{share:.1%}" if whole == f"{bound:.0%}" and share != bound else whole


def fmt_ms(v: float) -> str:
    return f"{v:.2f}"


# ---------------------------------------------------------------- throughput


def throughput(res: dict[str, Any]) -> list[str]:
    lines = [
        "| target | concurrency | req/s | p50 ms | p99 ms | server CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    levels = sorted({x["concurrency"] for t in res["targets"] for x in t["results"]})
    for c in levels:
        for t in res["targets"]:
            if x := level(res, t["name"], c):
                lines.append(
                    f"| {t['name']} | {c} | {x['rps']:,.0f} | {fmt_ms(x['p50'])} "
                    f"| {fmt_ms(x['p99'])} | {x['cpu_us']:,.0f} | {x['errors']} |"
                )

    def ratio(a: str, b: str, c: int) -> str:
        x, y = level(res, a, c), level(res, b, c)
        return f"{x['rps'] / y['rps']:.2f}×" if x and y and y["rps"] else "n/a"

    lines += [
        "",
        "Throughput ratios (median req/s):",
        "",
        "| concurrency | ours/reference | ours/bare | reference/bare | ours-prod/ours |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in res["settings"]["levels"]:
        lines.append(
            f"| {c} | {ratio('ours', 'reference', c)} | {ratio('ours', 'bare', c)} "
            f"| {ratio('reference', 'bare', c)} | {ratio('ours-prod', 'ours', c)} |"
        )
    err = [
        f"- {t['name']} @ {x['concurrency']}: "
        + ", ".join(f"{k} {v}" for k, v in x["error_detail"].items())
        for t in res["targets"]
        for x in t["results"]
        if x["errors"]
    ]
    if err:
        lines += [
            "",
            "Errors (summed over measured runs; rpc_errors = 2xx reply without a result):",
            "",
            *err,
        ]
    return lines


# ---------------------------------------------------------------- steadiness


def spread(x: Level) -> float:
    """(highest - lowest) req/s of the runs, as a share of their median, rounded to the whole
    percent the report shows (so that a bold 25% is never "above 25%")."""
    runs = x["runs_rps"]
    return round((max(runs) - min(runs)) / x["rps"], 2) if len(runs) > 1 and x["rps"] else 0.0


def steadiness(res: dict[str, Any]) -> list[str]:
    lines = [
        "| target | concurrency | req/s, lowest-highest run | spread | CPU steal % per run |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in res["targets"]:
        for x in t["results"]:
            runs, share = x["runs_rps"], spread(x)
            shown = f"**{share:.0%}**" if share > UNSTEADY else f"{share:.0%}"
            steal = ", ".join(f"{v:g}" for v in x.get("runs_steal_pct", []))
            lines.append(
                f"| {t['name']} | {x['concurrency']} | {min(runs):,.0f}-{max(runs):,.0f} "
                f"| {shown} | {steal} |"
            )
    return [
        *lines,
        "",
        f"Spread = (highest - lowest) / median req/s of a target's runs at one level. Above "
        f"{UNSTEADY:.0%} (bold) the machine's speed changed during the runs: the medians are "
        "less certain, and a target below that is judged on them says so. CPU steal is the "
        "share of the machine's CPU time that the hypervisor gave to other guests during each "
        "run (`/proc/stat`; 0 on bare metal): more than a few % means a slower machine for "
        "that run. A quieter hour or more `--runs` gives steadier figures.",
    ]


def unsteady(res: dict[str, Any], c: int, *names: str) -> str:
    """What to append to a target's figure when one of the levels it uses was unsteady."""
    shaky = [
        f"{n} {spread(x):.0%}"
        for n in names
        if (x := level(res, n, c)) is not None and spread(x) > UNSTEADY
    ]
    return f"; unsteady runs (spread: {', '.join(shaky)})" if shaky else ""


def steal_summary(res: dict[str, Any]) -> str:
    steal = [v for t in res["targets"] for x in t["results"] for v in x.get("runs_steal_pct", [])]
    if not steal:
        return "not recorded in this run"
    return f"median {statistics.median(steal):g}%, highest {max(steal):g}% of a run"


# ---------------------------------------------------------------- feature cost


def feature_cost(res: dict[str, Any]) -> list[str]:
    names = ["ours", *SINGLE, "ours-prod"]
    out: list[str] = []
    for c in res["settings"]["feature_levels"]:
        base = level(res, "ours", c)
        rows = [(n, x) for n in names if (x := level(res, n, c))]
        if not base or len(rows) < 2:
            continue
        out += [
            f"At concurrency {c}, relative to `ours` (medians). Redis CPU is the Redis "
            "server's own, not included in server CPU.",
            "",
            "| target | req/s | × ours | throughput cost | server CPU µs/req | Δ CPU µs/req "
            "| Redis CPU µs/req | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, x in rows:
            share = x["rps"] / base["rps"]
            redis = x.get("redis_cpu_us")
            out.append(
                f"| {n} | {x['rps']:,.0f} | {share:.2f} | {1 - share:.0%} | {x['cpu_us']:,.0f} "
                f"| {x['cpu_us'] - base['cpu_us']:+,.0f} "
                f"| {'' if redis is None else f'{redis:,.0f}'} | {fmt_ms(x['p99'])} "
                f"| {x['errors']} |"
            )
        singles = [x["cpu_us"] - base["cpu_us"] for n, x in rows if n in PROD_FEATURES]
        prod = level(res, "ours-prod", c)
        if prod and len(singles) == 3:
            added = prod["cpu_us"] - base["cpu_us"]
            out += [
                "",
                f"The three single features of ours-prod add {sum(singles):+,.0f} µs of server "
                f"CPU per request together; ours-prod adds {added:+,.0f} µs.",
            ]
        if prod:
            share = prod["rps"] / base["rps"]
            verdict = "met" if 1 - share <= PROD_COST else "not met"
            out += [
                "",
                f"**Production settings cost {percent(1 - share, PROD_COST)} of the plain echo "
                "throughput** "
                f"(ours-prod {prod['rps']:,.0f} / ours {base['rps']:,.0f} req/s = {share:.2f}); "
                f"target at most {PROD_COST:.0%}: **{verdict}**.",
            ]
        out.append("")
    return out or ["Not measured (needs `ours` and at least one `ours+…` or `ours-prod`)."]


# ---------------------------------------------------------------- memory


def memory_section(m: dict[str, Any] | None) -> list[str]:
    if not m:
        return ["Not measured (--memory-requests 0)."]
    if m.get("skipped"):
        return [f"Not measured: {m['skipped']}"]
    early, final = m["early"], m["final"]
    verdict = "met" if m["growth_mb"] < m["tolerance_mb"] else "not met"
    return [
        f"`ours` alone (`{m['command']}`), {final['requests']:,} echo requests by wrk at "
        f"{m['concurrency']} connections ({m['rps']:,.0f} req/s on average, "
        f"{m['errors']} errors). VmRSS of the server process, MiB:",
        "",
        "| when | requests so far | RSS MiB |",
        "|---|---:|---:|",
        f"| idle after start-up (one check request, 2 s quiet) | 1 | {m['idle_mb']:.1f} |",
        f"| after the first {early['requests']:,} | {early['requests']:,} "
        f"| {early['rss_mb']:.1f} |",
        f"| after {final['requests']:,} | {final['requests']:,} | {final['rss_mb']:.1f} |",
        f"| max under load (sampled every 1 s) | | {m['max_load_mb']:.1f} |",
        f"| 2 s after the load stopped | | {m['after_mb']:.1f} |",
        "",
        f"Growth between {early['requests']:,} and {final['requests']:,} requests: "
        f'{m["growth_mb"]:+.1f} MiB; tolerance for "no growth": < {m["tolerance_mb"]:g} MiB: '
        f"**{verdict}**. Idle target < {m['idle_target_mb']:g} MiB: "
        f"**{'met' if m['idle_mb'] < m['idle_target_mb'] else 'not met'}**.",
    ]


# ---------------------------------------------------------------- targets of the issue


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the performance issue: the measured figure and met (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def row(goal: str, measured: str, met: bool | None) -> None:
        rows.append({"goal": goal, "measured": measured, "met": met})

    c = GOAL_LEVEL
    ours, bare, ref = (level(res, n, c) for n in ("ours", "bare", "reference"))
    if ours and bare:
        share = ours["rps"] / bare["rps"]
        row(
            f"echo at c{c} ≥ {BARE_SHARE:.0%} of bare",
            f"{percent(share, BARE_SHARE)} ({ours['rps']:,.0f} vs {bare['rps']:,.0f} req/s)"
            + unsteady(res, c, "ours", "bare"),
            share >= BARE_SHARE,
        )
    else:
        row(f"echo at c{c} ≥ {BARE_SHARE:.0%} of bare", "not measured", None)
    if ours and ref:
        times = ours["rps"] / ref["rps"]
        row(
            f"echo at c{c} ≥ {REFERENCE_TIMES:g}× the reference",
            f"{times:.1f}× ({ours['rps']:,.0f} vs {ref['rps']:,.0f} req/s)"
            + unsteady(res, c, "ours", "reference"),
            times >= REFERENCE_TIMES,
        )
    else:
        row(f"echo at c{c} ≥ {REFERENCE_TIMES:g}× the reference", "not measured", None)
    if ours:
        row(
            f"p99 < {P99_MS:g} ms at c{c}",
            f"{ours['p99']:.2f} ms" + unsteady(res, c, "ours"),
            ours["p99"] < P99_MS,
        )
    else:
        row(f"p99 < {P99_MS:g} ms at c{c}", "not measured", None)
    heavy = level(res, "ours", ERROR_LEVEL)
    if heavy:
        row(
            f"no errors at c{ERROR_LEVEL}",
            f"{heavy['errors']} errors in {heavy['requests']:,} requests",
            heavy["errors"] == 0,
        )
    else:
        row(f"no errors at c{ERROR_LEVEL}", "not measured", None)
    m = res.get("memory") or {}
    if "idle_mb" in m:
        idle = m["idle_mb"]
        row(
            f"idle RSS < {m['idle_target_mb']:g} MiB", f"{idle:.1f} MiB", idle < m["idle_target_mb"]
        )
    else:
        row("idle RSS < 60 MiB", "not measured", None)
    if "growth_mb" in m:
        early, final = m["early"]["requests"], m["final"]["requests"]
        measured = f"{m['growth_mb']:+.1f} MiB from {early:,} to {final:,} requests"
        if final < FULL_MEMORY_RUN:
            row(
                f"no growth over {FULL_MEMORY_RUN:,} requests (< {m['tolerance_mb']:g} MiB)",
                f"{measured} (short run: not judged)",
                None,
            )
        else:
            row(
                f"no growth over {FULL_MEMORY_RUN:,} requests (< {m['tolerance_mb']:g} MiB)",
                measured,
                m["growth_mb"] < m["tolerance_mb"],
            )
    else:
        row(f"no growth over {FULL_MEMORY_RUN:,} requests", "not measured", None)
    prod = level(res, "ours-prod", c)
    if ours and prod:
        cost = 1 - prod["rps"] / ours["rps"]
        row(
            f"production settings cost ≤ {PROD_COST:.0%} of echo throughput (c{c})",
            f"{percent(cost, PROD_COST)} (ours-prod {prod['rps']:,.0f} vs ours "
            f"{ours['rps']:,.0f} req/s)" + unsteady(res, c, "ours", "ours-prod"),
            cost <= PROD_COST,
        )
    else:
        row(f"production settings cost ≤ {PROD_COST:.0%}", "not measured", None)
    return rows


def goals_table(rows: list[dict[str, Any]]) -> list[str]:
    verdict = {True: "met", False: "**not met**", None: "—"}
    lines = ["| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {r['goal']} | {r['measured']} | {verdict[r['met']]} |" for r in rows]
    return lines


# ---------------------------------------------------------------- the page


def servers(res: dict[str, Any]) -> list[str]:
    out = []
    for t in res["targets"]:
        out.append(f"- **{t['name']}**: `{t['command']}`")
        if t.get("note"):
            out.append(f"  - {t['note']}")
        if t["stack"]:
            reply = f"; reply {t['reply_bytes']} bytes" if t["reply_bytes"] else ""
            out.append(f"  - {t['stack']}{reply}")
        out += [f"  - check: {c}" for c in t["checks"]]
        if t["skipped"]:
            out.append("  - SKIPPED: " + t["skipped"].replace("\n", "\n    "))
        for x in t["results"]:
            rps = ", ".join(f"{r:,.0f}" for r in x["runs_rps"])
            out.append(
                f"  - c={x['concurrency']}: req/s per run {rps}; "
                f"server CPU {x['cpu_pct']:.0f}% of a core"
            )
    return out


def render(res: dict[str, Any]) -> str:
    s = res["settings"]
    out = [
        "# asap benchmark: POST /asap (echo)",
        "",
        f"- date: {res['date']}",
        *(f"- {k}: {v}" for k, v in res["machine"].items()),
        f"- CPU steal during the measured runs: {steal_summary(res)}",
        f"- command: `{res['command']}`",
        f"- settings: {s['runs']} runs × {s['duration']}s per target and concurrency "
        f"(median shown), {s['warmup']}s warm-up, wrk 1 thread, connections = concurrency, "
        f"runs interleaved across targets; single-feature targets at concurrency "
        f"{', '.join(map(str, s['feature_levels']))}; total {s['elapsed_s']:.0f}s",
        "",
        "## Throughput and latency",
        "",
        *throughput(res),
        "",
        "![throughput and p99 latency by concurrency](results.png)",
        "",
        "## Steadiness of the runs",
        "",
        *steadiness(res),
        "",
        "## Feature cost",
        "",
        *feature_cost(res),
        "## Memory",
        "",
        *memory_section(res.get("memory")),
        "",
        "## Servers",
        "",
        *servers(res),
        "",
        "Server CPU µs/req = (utime+stime of the server process over a run) / requests. "
        "Errors = non-2xx + 2xx replies without a JSON-RPC result + wrk socket errors, "
        "summed over the measured runs.",
        "",
        '## Targets (issue "Performance")',
        "",
        *goals_table(res["goals"]),
        "",
    ]
    return "\n".join(out)

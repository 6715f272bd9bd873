"""The container deployment (``docker/Dockerfile``, ``docker/compose.yaml``) without a container
engine: the files are read and checked, the image's wheel is built with the Dockerfile's own
build command from exactly what the Dockerfile copies, and then every compose service is run
as a local process with the service's command and environment (the image's ``ENV`` plus the
service's ``environment``) on top of that wheel: Redis is the one on 127.0.0.1:6379, the
worker runs as two replicas, the orchestrator points at a replica. The only changes made to a
service's configuration are service addresses rewritten to loopback ports and a unique key
prefix on Redis; the tests assert that.

What this does not prove: that the image builds (base image, apt/pip steps inside it), that
Docker's DNS spreads ``worker`` over the replicas, or that compose starts the services in the
order its ``depends_on`` says. docs/deployment.md says the same.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import yaml

from asap.models.ids import generate_id
from asap.process import AgentProcess, free_port
from tests.conftest import ROOT, asap_send, delete_redis_keys

pytestmark = pytest.mark.e2e

DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
LOOPBACK = "127.0.0.1"
REDIS_PORT = 6379
WORKER_REPLICAS = 2


# --- reading the files ------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD arguments."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + len("CMD") :]
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), per stage."""
    stages: list[list[Instruction]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM" or not stages:
            stages.append([])
        stages[-1].append(instruction)
    return stages


def only(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def image_env() -> dict[str, str]:
    """The runtime stage's ``ENV``: what every container starts with."""
    env: dict[str, str] = {}
    for instruction in only(dockerfile_stages()[-1], "ENV"):
        for pair in shlex.split(instruction.args):
            name, sep, value = pair.partition("=")
            assert sep, f"use ENV NAME=value, not {instruction.args!r}"
            env[name] = value
    return env


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]  # type: ignore[no-any-return]


def service_env(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, one ASAP_ variable a line"
    assert all(isinstance(v, str) for v in env.values()), env
    return env


def service_command(name: str) -> list[str]:
    """The service's command: its own ``command``, else the image's ``CMD``."""
    command = service(name).get("command")
    if command is None:
        return only(dockerfile_stages()[-1], "CMD")[-1].exec_form()
    return command if isinstance(command, list) else shlex.split(command)


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(path: str) -> bool:
    """Docker's rule, as far as this repository needs it: a pattern matches the path or one
    of its parent directories; ``**/`` matches any number of directories, including none."""
    parts = path.split("/")
    for pattern in dockerignore_patterns():
        assert not pattern.startswith("!"), "negations are not handled here"
        for end in range(1, len(parts) + 1):
            prefix = "/".join(parts[:end])
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(prefix, pattern[3:]):
                return True
    return False


# --- the files, as a user depends on them -----------------------------------------------------


def test_compose_has_the_three_services_each_with_a_healthcheck() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "worker", "orchestrator"}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("worker", "orchestrator"):
        assert services[name]["image"] == "asap:latest"
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and "http://127.0.0.1:8000/health" in " ".join(test)


def test_services_wait_for_what_they_need_to_be_healthy() -> None:
    assert service("worker")["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert service("orchestrator")["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "worker": {"condition": "service_healthy"},
    }


def test_worker_can_scale_and_only_the_orchestrator_is_published() -> None:
    worker = service("worker")
    for fixed in ("container_name", "ports", "hostname"):
        assert fixed not in worker, f"worker.{fixed} stops `--scale worker=3`"
    assert service("orchestrator")["ports"] == ["8000:8000"]
    assert "ports" not in service("redis")


def test_configuration_is_asap_variables_only() -> None:
    for name in ("worker", "orchestrator"):
        env = service_env(name)
        assert env, name
        assert all(key.startswith(("ASAP_", "PYTHON")) for key in env), env
    for key in image_env():
        assert key.startswith(("ASAP_", "PYTHON", "PIP_")), key
    worker, orchestrator = service_env("worker"), service_env("orchestrator")
    assert worker["ASAP_AGENT_ID"] == "urn:asap:agent:worker"
    assert orchestrator["ASAP_AGENT_ID"] == "urn:asap:agent:orchestrator"
    assert orchestrator["ASAP_PEERS"] == "worker=http://worker:8000"
    # one Redis, one prefix per agent type: replicas of a type share their state, and one
    # type never adopts the unfinished tasks of another
    worker_url, orchestrator_url = worker["ASAP_STORAGE_URL"], orchestrator["ASAP_STORAGE_URL"]
    assert urlsplit(worker_url).netloc == urlsplit(orchestrator_url).netloc == "redis:6379"
    assert redis_prefix(worker_url) != redis_prefix(orchestrator_url)
    assert image_env()["ASAP_LOG_FORMAT"] == "json"
    assert image_env()["PYTHONUNBUFFERED"] == "1"


def test_dockerfile_is_a_slim_multi_stage_build_run_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    preamble = " ".join(i.args for i in stages[0] if i.keyword == "ARG")
    for stage in stages[1:]:
        base = stage[0].args.split()[0]
        if base.startswith("${"):
            name = base.strip("${}")
            base = re.search(rf"{name}=(\S+)", preamble).group(1)  # type: ignore[union-attr]
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base), base
    build, runtime = stages[-2], stages[-1]
    assert any("pip wheel --no-deps" in i.args for i in only(build, "RUN"))
    assert any(i.args.startswith("--from=build") for i in only(runtime, "COPY"))
    install = " ".join(i.args for i in only(runtime, "RUN") if "pip install" in i.args)
    assert re.search(r"asap-\*\.whl\)?\[redis\]", install), install
    users = only(runtime, "USER")
    assert users and users[-1].args.split(":")[0] not in ("root", "0")
    keywords = [i.keyword for i in runtime]
    assert keywords.index("USER") < keywords.index("CMD")
    assert [i.args for i in only(runtime, "EXPOSE")] == ["8000"]
    health = only(runtime, "HEALTHCHECK")[-1].exec_form()
    assert health[0] == "python" and "http://127.0.0.1:8000/health" in health[-1]
    assert only(runtime, "CMD")[-1].exec_form() == [
        "uvicorn",
        "asap.server:app",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


def test_build_context_keeps_out_venvs_caches_git_and_databases() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-ref/bin/python",
        "asap/__pycache__/server.cpython-312.pyc",
        ".pytest_cache/v/cache",
        "asap-state.db",
        "asap-state.db-wal",
        "asap.egg-info/PKG-INFO",
        ".env",
    ):
        assert dockerignored(path), path
    for path in build_sources():
        assert not dockerignored(path), f"{path} is copied by the Dockerfile"
    assert not dockerignored("asap/server.py") and not dockerignored("skills/echo.py")


def test_make_targets_build_and_run_the_fleet() -> None:
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", "docker-build", "docker-up", "docker-down"],
        cwd=ROOT,
        # run from `make test` (as CI does), make would otherwise say which directory it enters
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "docker build -f docker/Dockerfile -t asap:latest .",
        "docker compose -f docker/compose.yaml up -d --scale worker=3",
        "docker compose -f docker/compose.yaml down",
    ]


# --- the image's wheel ------------------------------------------------------------------------


def build_sources() -> list[str]:
    """What the build stage copies from the context (``COPY src... dest``)."""
    sources: list[str] = []
    for instruction in only(dockerfile_stages()[-2], "COPY"):
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def build_context(target: Path) -> Path:
    """The build stage's sources as Docker would copy them: what the Dockerfile names,
    less what .dockerignore leaves out of the context."""
    for source in build_sources():
        origin = ROOT / source
        if origin.is_dir():
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and not dockerignored(relative):
                    (target / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / relative)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / source)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built by the build stage's own ``RUN pip wheel ...`` command."""
    context = build_context(tmp_path_factory.mktemp("context") / "src")
    out = tmp_path_factory.mktemp("wheels")
    (run,) = [i for i in only(dockerfile_stages()[-2], "RUN") if "pip wheel" in i.args]
    argv = shlex.split(run.args)
    assert argv[:2] == ["pip", "wheel"] and "/wheels" in argv
    argv = [sys.executable, "-m", *argv]
    argv[argv.index("/wheels")] = str(out)
    done = subprocess.run(argv, cwd=context, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("asap-*.whl")
    return built


def test_wheel_ships_the_server_and_the_skills_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "asap/server.py",
        "asap/transport/app.py",
        "asap/state/redis.py",
        "asap/examples/orchestration.py",
        "skills/__init__.py",
        "skills/echo.py",
        "skills/orchestrator.py",
    ):
        assert expected in names, expected
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Provides-Extra: redis" in text
    assert not re.search(r'^Requires-Dist: redis\b.*extra == "redis"', text, flags=re.M), text


# --- the fleet, run as local processes --------------------------------------------------------


def redis_prefix(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query)).get("prefix", "")


def localize(value: str, addresses: dict[str, str], namespace: str) -> str:
    """Point ``service:port`` at its loopback address; give Redis URLs the test's prefix."""
    for service_address, local in addresses.items():
        value = value.replace(f"//{service_address}", f"//{local}")
    if value.startswith("redis://"):
        parts = urlsplit(value)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "prefix"]
        query.append(("prefix", namespace + redis_prefix(value)))
        value = urlunsplit(parts._replace(query=urlencode(query, safe=":")))
    return value


def assert_only_addresses_changed(
    original: dict[str, str], local: dict[str, str], addresses: dict[str, str], namespace: str
) -> None:
    assert local.keys() == original.keys()
    back = {loopback: name for name, loopback in addresses.items()}
    for key, value in local.items():
        if value == original[key]:
            continue
        restored = value
        if restored.startswith("redis://"):
            assert redis_prefix(value) == namespace + redis_prefix(original[key]), key
            restored = restored.replace(f"prefix={namespace}", "prefix=")
            restored = restored.replace("?prefix=&", "?").removesuffix("?prefix=")
        for loopback, name in back.items():
            restored = restored.replace(f"//{loopback}", f"//{name}")
        assert restored == original[key], f"{key}: {value!r} is not {original[key]!r} moved"


def local_command(command: list[str], port: int) -> list[str]:
    """The service's command on a loopback port, run by this interpreter (``uvicorn`` is the
    console script of the same package in the image)."""
    assert command[0] == "uvicorn"
    args = list(command[1:])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "8000"
    args[args.index("--host") + 1] = LOOPBACK
    args[args.index("--port") + 1] = str(port)
    return ["-m", "uvicorn", *args]


@dataclass
class Fleet:
    workers: list[AgentProcess]
    orchestrator: AgentProcess
    namespace: str
    env: dict[str, str]
    """What a process in the image sees besides a service's own environment."""
    cwd: Path


def redis_reachable() -> bool:
    try:
        socket.create_connection((LOOPBACK, REDIS_PORT), timeout=0.5).close()
        return True
    except OSError:
        return False


def start(
    name: str,
    port: int,
    addresses: dict[str, str],
    fleet_env: dict[str, str],
    namespace: str,
    cwd: Path,
) -> AgentProcess:
    original = service_env(name)
    env = {key: localize(value, addresses, namespace) for key, value in original.items()}
    assert_only_addresses_changed(original, env, addresses, namespace)
    agent = AgentProcess(
        local_command(service_command(name), port), port, log_path=cwd / f"{name}-{port}.log"
    )
    agent.cwd = cwd
    inherited = {k: v for k, v in agent.env.items() if not k.startswith("ASAP_")}
    agent.env = {**inherited, **fleet_env, **env}
    return agent.start(wait=False)


@pytest.fixture(scope="module")
def fleet(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not redis_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable on {LOOPBACK}:{REDIS_PORT}")
        pytest.skip(f"Redis is not reachable on {LOOPBACK}:{REDIS_PORT} (start it to run this)")
    # the image's install step, into a directory of its own (the dependencies are those of
    # this environment): the agents run the wheel's code, not this checkout's
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cwd = tmp_path_factory.mktemp("workdir")
    fleet_env = {**image_env(), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import asap.server, skills.echo; print(asap.__file__)"],
        env={**os.environ, **fleet_env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip() == str(site / "asap" / "__init__.py"), where

    namespace = f"asap-test-{generate_id()}:"
    redis_address = f"{LOOPBACK}:{REDIS_PORT}"
    ports = [free_port() for _ in range(WORKER_REPLICAS)]
    workers: list[AgentProcess] = []
    orchestrator: AgentProcess | None = None
    try:
        for port in ports:
            workers.append(
                start("worker", port, {"redis:6379": redis_address}, fleet_env, namespace, cwd)
            )
        for worker in workers:  # depends_on: worker healthy
            worker.wait_ready(60)
        addresses = {"redis:6379": redis_address, "worker:8000": f"{LOOPBACK}:{ports[0]}"}
        orchestrator = start("orchestrator", free_port(), addresses, fleet_env, namespace, cwd)
        orchestrator.wait_ready(60)
        yield Fleet(workers, orchestrator, namespace, fleet_env, cwd)
    finally:
        for agent in [*workers, *([orchestrator] if orchestrator else [])]:
            agent.stop()
        delete_redis_keys(namespace, f"redis://{LOOPBACK}:{REDIS_PORT}/0")


def redis_client() -> Any:
    import redis

    return redis.Redis(host=LOOPBACK, port=REDIS_PORT, db=0)


def task_records(namespace: str, agent_prefix: str) -> dict[str, dict[str, Any]]:
    """Task records stored under one agent type's prefix, by task id."""
    client = redis_client()
    try:
        stem = f"{namespace}{agent_prefix}task:"
        records = {}
        for key in client.scan_iter(match=stem + "*", count=1000):
            text = client.hget(key, "record")
            if text is not None:
                records[key.decode().removeprefix(stem)] = json.loads(text)
        return records
    finally:
        client.close()


def rpc(url: str, payload_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One envelope to ``url``; the whole JSON-RPC reply."""
    body = asap_send(payload_type, payload, recipient="urn:asap:agent:worker")
    reply = httpx.post(url + "/asap", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def payload(reply: dict[str, Any]) -> dict[str, Any]:
    assert "result" in reply, reply
    return reply["result"]["envelope"]["payload"]  # type: ignore[no-any-return]


def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """``check()``'s first truthy value, polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def query_until_completed(url: str, task_id: str) -> dict[str, Any]:
    """``state.query`` at ``url`` until the task is known there and completed."""

    def completed() -> dict[str, Any] | None:
        reply = rpc(url, "state.query", {"task_id": task_id})
        if "error" in reply:
            assert reply["error"]["code"] == -32010, reply  # not stored yet
            return None
        state = payload(reply)
        return state if state["status"] == "completed" else None

    return eventually(completed, f"{task_id} completed, seen from {url}")  # type: ignore[no-any-return]


def owned_by(record: dict[str, Any], agent: AgentProcess) -> bool:
    """Whether ``agent`` ran the task (instance names are ``host-pid-random``)."""
    return f"-{agent.pid}-" in (record.get("owner") or "")


def test_healthchecks_pass_on_the_running_services_and_fail_on_a_dead_one(fleet: Fleet) -> None:
    def run(test: list[str], port: int) -> int:
        assert test[0] == "CMD"
        argv = [arg.replace(f"{LOOPBACK}:8000", f"{LOOPBACK}:{port}") for arg in test[1:]]
        if argv[0] == "python":
            argv[0] = sys.executable
        return subprocess.run(argv, capture_output=True, timeout=30, env=fleet.env).returncode

    dockerfile_check = only(dockerfile_stages()[-1], "HEALTHCHECK")[-1].exec_form()
    for name, agent in [("worker", w) for w in fleet.workers] + [
        ("orchestrator", fleet.orchestrator)
    ]:
        assert run(service(name)["healthcheck"]["test"], agent.port) == 0, name
        assert run(["CMD", *dockerfile_check], agent.port) == 0, name
    assert run(service("worker")["healthcheck"]["test"], free_port()) != 0
    if shutil.which("redis-cli"):
        assert run(service("redis")["healthcheck"]["test"], REDIS_PORT) == 0


def test_tutorial_orchestration_runs_on_two_worker_replicas_sharing_state(fleet: Fleet) -> None:
    replica_1, replica_2 = fleet.workers
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asap.examples.orchestration",
            "--worker-a-url",
            replica_1.url,
            "--worker-b-url",
            replica_2.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **fleet.env},
        cwd=fleet.cwd,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (complete,) = [e for e in events if e["event"] == "asap.orchestration.complete"]
    result_a, result_b = complete["result_a"], complete["result_b"]
    assert result_a["result"] == {"echoed": {"step": "a", "message": "task for worker A"}}
    assert result_b["result"] == {"echoed": {"step": "b", "message": "task for worker B"}}
    # each replica answers for the task the other one ran
    assert (
        query_until_completed(replica_2.url, result_a["task_id"])["result"] == (result_a["result"])
    )
    assert (
        query_until_completed(replica_1.url, result_b["task_id"])["result"] == (result_b["result"])
    )
    records = task_records(fleet.namespace, redis_prefix(service_env("worker")["ASAP_STORAGE_URL"]))
    assert owned_by(records[result_a["task_id"]], replica_1)
    assert owned_by(records[result_b["task_id"]], replica_2)


def test_orchestrator_runs_a_parallel_plan_on_the_workers_and_state_is_shared(
    fleet: Fleet,
) -> None:
    replica_1, replica_2 = fleet.workers  # the orchestrator's `worker` is replica 1
    plan = {
        "mode": "parallel",
        "steps": [
            {"id": f"s{n}", "peer": "worker", "skill": "echo", "input": {"n": n}} for n in range(6)
        ],
    }
    reply = rpc(
        fleet.orchestrator.url,
        "task.request",
        {"conversation_id": "deploy", "skill_id": "orchestrate", "input": plan},
    )
    outcome = payload(reply)
    assert outcome["status"] == "completed", outcome
    steps = outcome["result"]["steps"]
    assert [s["status"] for s in steps] == ["completed"] * 6
    assert [s["result"] for s in steps] == [{"echoed": {"n": n}} for n in range(6)]
    assert outcome["result"]["state"]["completed"] is True
    step_tasks = [s["task_id"] for s in steps]

    # the other replica answers state.query for every step, from Redis
    for step, task_id in zip(steps, step_tasks, strict=True):
        assert query_until_completed(replica_2.url, task_id)["result"] == step["result"]
    worker_prefix = redis_prefix(service_env("worker")["ASAP_STORAGE_URL"])
    workers_records = task_records(fleet.namespace, worker_prefix)
    assert set(step_tasks) <= set(workers_records)
    for task_id in step_tasks:
        record = workers_records[task_id]
        assert record["status"] == "completed" and record["skill_id"] == "echo"
        assert record["sender"] == "urn:asap:agent:orchestrator"
        assert owned_by(record, replica_1), record["owner"]

    # the orchestration itself is the orchestrator's, under its own prefix
    orchestrator_prefix = redis_prefix(service_env("orchestrator")["ASAP_STORAGE_URL"])
    own = eventually(
        lambda: task_records(fleet.namespace, orchestrator_prefix).get(outcome["task_id"]),
        "the orchestration's record in Redis",
    )
    assert own["status"] == "completed" and own["skill_id"] == "orchestrate"
    assert outcome["task_id"] not in workers_records
    unknown = rpc(replica_2.url, "state.query", {"task_id": outcome["task_id"]})
    assert unknown["error"]["code"] == -32010


def test_worker_replicas_share_idempotency(fleet: Fleet) -> None:
    request = {
        "conversation_id": "deploy-idempotency",
        "skill_id": "echo",
        "input": {"once": True},
        "config": {"idempotency_key": f"deploy-{generate_id()}"},
    }
    first = payload(rpc(fleet.workers[0].url, "task.request", request))
    second = payload(rpc(fleet.workers[1].url, "task.request", request))
    assert first["status"] == "completed"
    assert second["task_id"] == first["task_id"]
    assert second["result"] == {"echoed": {"once": True}}

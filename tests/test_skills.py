"""Skills: the decorator, the registry, input validation, the context, failures (issue 2.3)."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, field_validator

from asap import Context, SkillRegistry, skill
from asap.errors import ConfigurationError
from asap.settings import Settings
from asap.transport.app import create_app
from asap.transport.pool import ClientPool
from tests.conftest import echo_settings, serve_in_process

pytestmark = pytest.mark.anyio

TEST_SKILLS = [
    "bad-return",
    "echo",
    "fail",
    "greet",
    "not-json",
    "note",
    "own-timeout",
    "progress",
    "sleep",
    "whoami",
]
"""What the test agent serves (skills.echo and tests.agent_skills), sorted."""


def frame(skill_id: str, data: dict[str, Any], **payload: Any) -> dict[str, Any]:
    envelope = {
        "asap_version": "0.1",
        "sender": "urn:asap:agent:tester",
        "recipient": "urn:asap:agent:echo-agent",
        "payload_type": "task.request",
        "payload": {"conversation_id": "conv-1", "skill_id": skill_id, "input": data, **payload},
        "trace_id": "trace-1",
    }
    return {"jsonrpc": "2.0", "method": "asap.send", "params": {"envelope": envelope}, "id": 1}


def test_decorator_returns_the_function_unchanged() -> None:
    def plain(data: dict[str, Any]) -> dict[str, Any]:
        return data

    assert skill("plain")(plain) is plain
    assert plain({"a": 1}) == {"a": 1}


def test_registry_collects_marked_functions_and_rejects_unmarked() -> None:
    @skill("one", description="first")
    async def one(data: dict[str, Any]) -> dict[str, Any]:
        return data

    def unmarked(data: dict[str, Any]) -> dict[str, Any]:
        return data

    registry = SkillRegistry([one])
    assert registry.ids() == ["one"] and "one" in registry and len(registry) == 1
    assert registry.get("one").description == "first"  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="not marked with @skill"):
        registry.add(unmarked)
    registry.add(unmarked, skill_id="two")
    assert registry.ids() == ["one", "two"]


def test_duplicate_skill_id_fails_with_both_names() -> None:
    registry = SkillRegistry()
    registry.load("skills.echo")
    with pytest.raises(ConfigurationError) as info:
        registry.load("tests.dup_skills")
    message = str(info.value)
    assert "Duplicate skill id 'echo'" in message
    assert "skills.echo.echo" in message and "tests.dup_skills.another_echo" in message


def test_registries_are_independent_instances() -> None:
    first, second = SkillRegistry(), SkillRegistry()
    first.load("skills.echo")
    assert second.ids() == [] and first.ids() == ["echo"]


def test_description_defaults_to_docstring_and_bad_signatures_fail() -> None:
    @skill("documented")
    def documented(data: dict[str, Any]) -> None:
        """First line.

        More.
        """

    assert SkillRegistry([documented]).get("documented").description == "First line."  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="must take"):

        @skill("three-args")
        def three(a: Any, b: Any, c: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="generator"):

        @skill("gen")
        async def gen(data: Any) -> Any:
            yield data


def test_unknown_skill_module_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="cannot import skill module 'nope.nothing'"):
        SkillRegistry().load("nope.nothing")


@pytest.fixture
async def agent() -> Any:
    settings = echo_settings(skills=("skills.echo", "tests.agent_skills"))
    async with serve_in_process(create_app(settings)) as client:
        yield client


async def call(agent: httpx.AsyncClient, skill_id: str, data: dict[str, Any], **kw: Any) -> Any:
    response = await agent.post("/asap", json=frame(skill_id, data, **kw))
    assert response.status_code == 200
    return response.json()


async def test_manifest_publishes_schemas_of_annotated_models(agent: httpx.AsyncClient) -> None:
    skills = {
        s["id"]: s
        for s in (await agent.get("/.well-known/asap/manifest.json")).json()["capabilities"][
            "skills"
        ]
    }
    assert sorted(skills) == TEST_SKILLS
    greet = skills["greet"]
    assert greet["description"] == "Greet someone, validated by pydantic models"
    assert greet["input_schema"]["properties"]["name"]["minLength"] == 1
    assert greet["input_schema"]["required"] == ["name"]
    assert greet["output_schema"]["properties"]["text"]["type"] == "string"
    assert skills["echo"]["input_schema"] is None and skills["echo"]["output_schema"] is None


async def test_typed_skill_gets_a_model_and_returns_one(agent: httpx.AsyncClient) -> None:
    reply = await call(agent, "greet", {"name": "ada", "times": 2})
    payload = reply["result"]["envelope"]["payload"]
    assert payload["status"] == "completed"
    assert payload["result"] == {"text": "hello ada hello ada"}


async def test_invalid_input_is_32602_with_validation_errors(agent: httpx.AsyncClient) -> None:
    reply = await call(agent, "greet", {"name": "", "times": 9})
    error = reply["error"]
    assert error["code"] == -32602 and error["message"] == "Invalid params"
    assert error["data"]["error"] == "Invalid skill input"
    assert error["data"]["skill_id"] == "greet"
    locations = sorted(e["loc"] for e in error["data"]["validation_errors"])
    assert locations == [["name"], ["times"]]


async def test_unknown_skill_lists_available_skills(agent: httpx.AsyncClient) -> None:
    error = (await call(agent, "nope", {}))["error"]
    assert error["code"] == -32013
    assert error["message"] == "Unknown skill: nope"
    assert error["data"]["details"] == {
        "skill_id": "nope",
        "available_skills": TEST_SKILLS,
    }
    assert error["data"]["recoverable"] is False


async def test_sync_skill_runs_in_a_worker_thread_with_its_context(
    agent: httpx.AsyncClient,
) -> None:
    reply = await call(agent, "whoami", {}, config={"timeout_seconds": 30})
    envelope = reply["result"]["envelope"]
    seen = envelope["payload"]["result"]
    assert seen["thread"] != threading.main_thread().name
    assert seen["task_id"] == envelope["payload"]["task_id"]
    assert seen["conversation_id"] == "conv-1"
    assert seen["trace_id"] == "trace-1"
    assert seen["envelope_id"] == envelope["correlation_id"]
    assert seen["skill_id"] == "whoami"
    assert seen["agent_id"] == "urn:asap:agent:echo-agent"
    assert 29 < seen["time_left"] <= 30
    assert seen["has_client"] is True


async def test_raising_skill_gives_a_failed_task_without_traceback(
    agent: httpx.AsyncClient,
) -> None:
    payload = (await call(agent, "fail", {"message": "disk full"}))["result"]["envelope"]["payload"]
    assert payload["status"] == "failed"
    assert payload["result"] == {"error": {"type": "ValueError", "message": "disk full"}}


async def test_debug_adds_the_traceback() -> None:
    settings = echo_settings(skills=("tests.agent_skills",), debug=True)
    async with serve_in_process(create_app(settings)) as agent:
        error = (await call(agent, "fail", {}))["result"]["envelope"]["payload"]["result"]["error"]
    assert error["type"] == "ValueError"
    assert any("raise ValueError" in line for line in error["traceback"])


async def test_wrong_return_type_fails_the_task_clearly(agent: httpx.AsyncClient) -> None:
    payload = (await call(agent, "bad-return", {}))["result"]["envelope"]["payload"]
    assert payload["status"] == "failed"
    assert payload["result"]["error"]["type"] == "TypeError"
    assert "return a dict, a pydantic model or None" in payload["result"]["error"]["message"]


async def test_context_offers_the_shared_client_and_sub_requests() -> None:
    seen: dict[str, Any] = {}

    @skill("probe")
    async def probe(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        seen["client"] = ctx.client
        sub = ctx.task_request("urn:asap:agent:worker-a", "echo", {"x": 1})
        seen["sub"] = sub
        return {}

    registry = SkillRegistry([probe])
    async with serve_in_process(create_app(echo_settings(), registry)) as agent:
        await call(agent, "probe", {})
    assert isinstance(seen["client"], ClientPool)
    sub = seen["sub"]
    assert sub.payload.conversation_id == "conv-1"
    assert sub.payload.parent_task_id.startswith("task_")
    assert sub.trace_id == "trace-1" and sub.sender == "urn:asap:agent:echo-agent"


validated: list[str] = []


class Counted(BaseModel):
    """An input that counts its validations."""

    name: str

    @field_validator("name")
    @classmethod
    def count(cls, value: str) -> str:
        validated.append(value)
        return value


async def test_a_typed_input_is_validated_once_per_task() -> None:
    @skill("counted")
    async def counted(data: Counted) -> dict[str, Any]:
        return {"name": data.name}

    registry = SkillRegistry([counted])
    async with serve_in_process(create_app(echo_settings(), registry)) as agent:
        assert (await call(agent, "counted", {"name": "waited"}))["result"]
        body = frame("counted", {"name": "respond-async"})
        headers = {"prefer": "respond-async"}
        assert (await agent.post("/asap", json=body, headers=headers)).json()["result"]
        streamed = await agent.post("/asap/stream", json=frame("counted", {"name": "streamed"}))
        assert '"status":"completed"' in streamed.text
    assert sorted(validated) == ["respond-async", "streamed", "waited"]


def test_settings_read_skills_and_ids_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "ASAP_SKILLS": "skills.echo, tests.agent_skills",
            "ASAP_AGENT_ID": "urn:asap:agent:x",
            "ASAP_DEBUG": "true",
            "ASAP_MAX_BATCH_SIZE": "7",
        }
    )
    assert settings.skills == ("skills.echo", "tests.agent_skills")
    assert settings.agent_id == "urn:asap:agent:x" and settings.debug is True
    assert settings.max_batch_size == 7
    with pytest.raises(ConfigurationError, match="ASAP_AGENT_ID"):
        Settings.from_env({"ASAP_AGENT_ID": "not-a-urn"})
    with pytest.raises(ConfigurationError, match="ASAP_DEBUG must be true or false"):
        Settings.from_env({"ASAP_DEBUG": "maybe"})
    optional = Settings.from_env({"ASAP_TASK_TIMEOUT_SECONDS": "", "ASAP_PUBLIC_URL": ""})
    assert optional.task_timeout_seconds is None and optional.public_url is None
    # a blank text setting (compose's `ASAP_STORAGE_URL=${REDIS_URL:-}`) keeps its default
    blank = Settings.from_env({"ASAP_STORAGE_URL": "", "ASAP_LOG_LEVEL": "  "})
    assert blank.storage_url == Settings().storage_url and blank.log_level == "INFO"
    assert Settings.from_env({"ASAP_TASK_TIMEOUT_SECONDS": "30"}).task_timeout_seconds == 30
    with pytest.raises(ConfigurationError, match="ASAP_TASK_TIMEOUT_SECONDS must be an integer"):
        Settings.from_env({"ASAP_TASK_TIMEOUT_SECONDS": "soon"})

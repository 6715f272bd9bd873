"""Skills: plain functions marked with ``@skill`` and collected into a :class:`SkillRegistry`.

A skill is ``def`` or ``async def``; a sync skill runs in a worker thread. Its first parameter
is the task input, an optional second one the :class:`~asap.context.Context`. When the input
(or the return value) is annotated with a pydantic model, the input is validated against it and
both JSON Schemas are published in the manifest (``Skill.input_schema`` / ``output_schema``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar, get_type_hints

import orjson
from pydantic import BaseModel, ValidationError

from asap.errors import ConfigurationError, InvalidParamsError
from asap.models.entities import Skill
from asap.transport.jsonrpc import validation_errors

__all__ = ["SkillRegistry", "SkillSpec", "skill"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__asap_skill__"


@dataclass(frozen=True)
class SkillSpec:
    """A registered skill: its id, description, function and optional pydantic models."""

    id: str
    description: str
    func: Callable[..., Any]
    input_model: type[BaseModel] | None
    output_model: type[BaseModel] | None
    takes_context: bool
    is_async: bool
    resumable: bool = False
    """Run again from its latest checkpoint (``ctx.resumed``) if its agent stops mid-task."""

    @property
    def qualname(self) -> str:
        """``module.function``, for messages and logs."""
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def to_manifest(self) -> Skill:
        """The manifest entry of this skill, with JSON Schemas when models are annotated."""
        return Skill(
            id=self.id,
            description=self.description,
            input_schema=self.input_model.model_json_schema() if self.input_model else None,
            output_schema=self.output_model.model_json_schema() if self.output_model else None,
        )

    def parse_input(self, data: dict[str, Any]) -> Any:
        """Validate the task input; raise :class:`InvalidParamsError` (-32602) when it fails."""
        if self.input_model is None:
            return data
        try:
            return self.input_model.model_validate(data)
        except ValidationError as exc:
            raise InvalidParamsError(
                {
                    "error": "Invalid skill input",
                    "skill_id": self.id,
                    "validation_errors": validation_errors(exc),
                }
            ) from None

    def dump_output(self, value: Any) -> dict[str, Any] | None:
        """Turn a skill's return value into the ``result`` object of a task response.

        A dict must have a JSON form (what the reply and the stored task carry): a value such
        as a set fails the task here, rather than the reply and every later write of the
        task outbox."""
        if value is None:
            return None
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if not isinstance(value, dict):
            raise TypeError(
                f"skill {self.id!r} returned {type(value).__name__}; "
                "return a dict, a pydantic model or None"
            )
        try:
            orjson.dumps(value)
        except TypeError as exc:  # orjson.JSONEncodeError
            message = f"skill {self.id!r} returned a value JSON cannot carry: {exc}"
            raise TypeError(message) from None
        return value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _spec_for(
    func: Callable[..., Any], skill_id: str, description: str | None, resumable: bool = False
) -> SkillSpec:
    if not skill_id or not isinstance(skill_id, str):
        raise ConfigurationError(f"skill id must be a non-empty string, got {skill_id!r}")
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise ConfigurationError(f"skill {skill_id!r}: generator functions are not skills")
    params = list(inspect.signature(func).parameters.values())
    if not 1 <= len(params) <= 2:
        raise ConfigurationError(
            f"skill {skill_id!r} must take (input) or (input, ctx), "
            f"{func.__qualname__} takes {len(params)} parameters"
        )
    try:
        hints = get_type_hints(func)
    except Exception as exc:  # unresolvable annotations: say which skill
        raise ConfigurationError(f"skill {skill_id!r}: cannot resolve annotations: {exc}") from exc
    doc = inspect.getdoc(func)
    return SkillSpec(
        id=skill_id,
        description=description or (doc.splitlines()[0] if doc else skill_id),
        func=func,
        input_model=_model_of(hints.get(params[0].name)),
        output_model=_model_of(hints.get("return")),
        takes_context=len(params) == 2,
        is_async=inspect.iscoroutinefunction(func),
        resumable=resumable,
    )


def skill(
    skill_id: str, *, description: str | None = None, resumable: bool = False
) -> Callable[[F], F]:
    """Mark a function as the skill ``skill_id``; the function is returned unchanged.

    ``description`` defaults to the first line of the docstring. A ``resumable`` skill is run
    again from its latest checkpoint when its agent stops mid-task (it reads ``ctx.resumed``).
    """

    def mark(func: F) -> F:
        setattr(func, _MARK, _spec_for(func, skill_id, description, resumable))
        return func

    return mark


class SkillRegistry:
    """The skills one agent serves, by id. A duplicate id raises at registration."""

    def __init__(self, skills: list[Callable[..., Any]] | None = None) -> None:
        self._skills: dict[str, SkillSpec] = {}
        for func in skills or []:
            self.add(func)

    def __repr__(self) -> str:
        return f"SkillRegistry({sorted(self._skills)})"

    def __len__(self) -> int:
        return len(self._skills)

    def __iter__(self) -> Iterator[SkillSpec]:
        return iter(self._skills.values())

    def __contains__(self, skill_id: object) -> bool:
        return skill_id in self._skills

    def add(
        self, func: Callable[..., Any], skill_id: str | None = None, description: str | None = None
    ) -> SkillSpec:
        """Register a function marked with ``@skill``, or any function given a ``skill_id``."""
        spec: SkillSpec | None = getattr(func, _MARK, None)
        if skill_id is not None:
            spec = _spec_for(func, skill_id, description)
        if spec is None:
            raise ConfigurationError(
                f"{getattr(func, '__qualname__', func)!r} is not marked with @skill; "
                "decorate it or pass skill_id"
            )
        existing = self._skills.get(spec.id)
        if existing is not None and existing.func is not spec.func:
            raise ConfigurationError(
                f"Duplicate skill id {spec.id!r}: defined by {existing.qualname} "
                f"and {spec.qualname}"
            )
        self._skills[spec.id] = spec
        return spec

    def add_module(self, module: ModuleType) -> int:
        """Register every ``@skill`` function defined in ``module``; return how many."""
        count = 0
        for value in vars(module).values():
            if callable(value) and getattr(value, _MARK, None) is not None:
                if getattr(value, "__module__", None) == module.__name__:
                    self.add(value)
                    count += 1
        return count

    def load(self, name: str) -> int:
        """Import a module (or every module of a package) by name and register its skills."""
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import skill module {name!r}: {exc}") from exc
        count = self.add_module(module)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            count += self.load(f"{name}.{info.name}")
        return count

    def get(self, skill_id: str) -> SkillSpec | None:
        """The skill with this id, or None."""
        return self._skills.get(skill_id)

    def ids(self) -> list[str]:
        """Registered skill ids, sorted."""
        return sorted(self._skills)

    def manifest_skills(self) -> list[Skill]:
        """Manifest entries of every skill, sorted by id."""
        return [self._skills[i].to_manifest() for i in self.ids()]

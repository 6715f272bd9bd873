"""The public API: what ``import asap`` offers is deliberate and sorted."""

from __future__ import annotations

import asap


def test_public_names_are_locked() -> None:
    assert asap.__all__ == [
        "ASAPClient",
        "ASAPError",
        "Context",
        "Settings",
        "SkillRegistry",
        "SkillSpec",
        "create_app",
        "skill",
    ]
    assert asap.__all__ == sorted(asap.__all__)
    for name in asap.__all__:
        assert getattr(asap, name).__doc__, f"{name} has no docstring"


def test_seed_import_paths_exist() -> None:
    from asap.models.entities import Manifest, StateSnapshot  # noqa: F401
    from asap.models.envelope import Envelope  # noqa: F401
    from asap.models.ids import generate_id  # noqa: F401
    from asap.models.payloads import TaskRequest  # noqa: F401
    from asap.observability.logging import bind_context, clear_context, get_logger  # noqa: F401
    from asap.transport.client import ASAPClient  # noqa: F401


def test_every_environment_variable_is_in_the_configuration_reference() -> None:
    """docs/configuration.md names every Settings field's variable and every other ASAP_
    variable the package reads."""
    import re
    from dataclasses import fields
    from pathlib import Path

    from asap.settings import Settings

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "configuration.md").read_text()
    wanted = {f"ASAP_{f.name.upper()}" for f in fields(Settings) if f.name != "extra"}
    for source in (root / "asap").rglob("*.py"):
        wanted |= set(re.findall(r"\bASAP_[A-Z][A-Z_]*[A-Z]\b", source.read_text()))
    wanted -= {"ASAP_VERSION"}  # the protocol header's name, not a variable
    missing = sorted(name for name in wanted if f"`{name}`" not in doc)
    assert missing == []

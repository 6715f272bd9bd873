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

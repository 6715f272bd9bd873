"""asap: build agents that talk to each other over ASAP (Async Simple Agent Protocol).

Write a skill as a plain function, mark it with :func:`skill`, and serve it with
``uvicorn asap.server:app`` or :func:`create_app`.
"""

from __future__ import annotations

from asap.context import Context
from asap.errors import ASAPError
from asap.registry import SkillRegistry, SkillSpec, skill
from asap.settings import Settings
from asap.transport.app import create_app
from asap.transport.client import ASAPClient

__all__ = [
    "ASAPClient",
    "ASAPError",
    "Context",
    "Settings",
    "SkillRegistry",
    "SkillSpec",
    "create_app",
    "skill",
]

__version__ = "0.1.0"

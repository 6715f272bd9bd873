"""``uvicorn asap.server:app``: an agent built from ``ASAP_`` environment settings.

By default it serves the skills shipped in the top-level ``skills`` package; set
``ASAP_SKILLS=mypkg.skills,other.module`` to serve yours, ``ASAP_AGENT_ID`` to name it.
"""

from __future__ import annotations

from asap.transport.app import create_app

app = create_app()

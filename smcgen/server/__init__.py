"""The OpenAI-compatible HTTP server over one :class:`smcgen.Engine` (``smcgen serve MODEL``).

Needs the ``server`` extra (FastAPI, uvicorn): ``pip install -e ".[server]"``.
"""

from smcgen.server.app import create_app

__all__ = ["create_app"]

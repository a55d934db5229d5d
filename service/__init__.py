"""The service: FastAPI app, worker loop, settings and the ``dendro`` CLI."""

from __future__ import annotations

from ._app import create_app
from ._settings import Settings, get_settings
from .worker import Worker, WorkerConfig

__all__ = ["create_app", "Settings", "get_settings", "Worker", "WorkerConfig"]

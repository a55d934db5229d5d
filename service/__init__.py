"""The service: FastAPI app, worker loop, settings and the ``dendro`` CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import create_app
    from ._settings import Settings, get_settings
    from .worker import Worker, WorkerConfig

__all__ = ["create_app", "Settings", "get_settings", "Worker", "WorkerConfig"]

# Imported on first use, so that a worker (`dendro worker`) loads no web code.
_HOMES = {
    "create_app": "._app",
    "Settings": "._settings",
    "get_settings": "._settings",
    "Worker": ".worker",
    "WorkerConfig": ".worker",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value

"""FastAPI dependencies as Annotated aliases: settings, storage, auth."""

from __future__ import annotations

import hmac
from typing import Annotated

import optuna
from fastapi import Depends, HTTPException, Request, status

from ._settings import Settings
from ._snapshots import Snapshots

__all__ = ["SettingsDep", "StorageDep", "SnapshotsDep", "WriteAuth", "ReadAuth", "token_ok"]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _storage(request: Request) -> optuna.storages.RDBStorage:
    return request.app.state.storage()


def _snapshots(request: Request) -> Snapshots:
    return request.app.state.snapshots


SettingsDep = Annotated[Settings, Depends(_settings)]
StorageDep = Annotated[optuna.storages.RDBStorage, Depends(_storage)]
SnapshotsDep = Annotated[Snapshots, Depends(_snapshots)]


def token_ok(presented: str | None, expected: str) -> bool:
    """Constant-time comparison, so response times do not leak the token."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-token") or request.cookies.get("dendro_token")


def _require(request: Request) -> None:
    expected = request.app.state.settings.token
    if expected is None:
        return
    if not token_ok(presented_token(request), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="this request needs the API token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _require_read(request: Request) -> None:
    if request.app.state.settings.read_requires_token:
        _require(request)


WriteAuth = Depends(_require)
ReadAuth = Depends(_require_read)

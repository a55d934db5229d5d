"""The app factory: REST API under /v1, our page at /, Optuna's dashboard at /dashboard, one storage."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import optuna
import sqlalchemy as sa
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import studies

from ._docs import DOCS_URL, add_docs
from ._errors import db_unreachable, spec_error_items
from ._page import add_page
from ._settings import Settings
from ._snapshots import Snapshots
from .deps import presented_token, token_ok
from .routes import health, workers
from .routes import studies as studies_routes

__all__ = ["create_app"]

log = logging.getLogger("dendro.api")
_DB_DOWN = "the database is unavailable right now; the request was not carried out. Retry shortly."
_NAME_RULE = ("a study name is 1-64 characters: letters, digits, '.', '_' or '-', starting with a "
              "letter or digit")


class _ServerTiming:
    """``Server-Timing: app;dur=<ms>`` on every response: the time from the request reaching
    the app to its response headers, to tell the server's share of a latency from the
    network's and the client's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed(message: Any) -> None:
            if message["type"] == "http.response.start":
                ms = 1000 * (time.perf_counter() - t0)
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", f"app;dur={ms:.1f}".encode())]}
            await send(message)

        await self.app(scope, receive, timed)


class _BodyLimit:
    """Refuse request bodies over the configured size (413) before the app sees them.

    A declared ``Content-Length`` over the limit is refused before anything is read. A
    chunked body, whose size is not declared, is read here up to the limit and handed on
    whole, so that the dashboard's WSGI app is guarded as well as our routes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = JSONResponse(
            {"detail": f"request body over the limit of {self.max_bytes} bytes", "field": "body"},
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
        )
        await resp(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            # The server never passes on more than the declared length.
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)
            return
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        pending: list[Message] = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class _DashboardGuard:
    """The dashboard's writes need the same token as ours; reads stay open unless configured."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.settings.token
        if scope["type"] == "http" and token is not None:
            request = Request(scope)
            is_write = scope["method"] not in ("GET", "HEAD", "OPTIONS")
            if (is_write or self.settings.read_requires_token) and not token_ok(presented_token(request), token):
                resp = JSONResponse({"detail": "this dashboard action needs the API token"},
                                    status_code=status.HTTP_401_UNAUTHORIZED)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, *, dashboard: bool = True) -> FastAPI:
    """Build the API for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    url = settings.storage_url
    lock = threading.Lock()
    holder: dict[str, optuna.storages.RDBStorage] = {}

    def storage() -> optuna.storages.RDBStorage:
        # Opened on first use so that the API starts, and answers 503, while the DB is down.
        with lock:
            if "s" not in holder:
                holder["s"] = studies.open_storage(
                    url, heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period,
                )
            return holder["s"]

    app = FastAPI(
        title="dendro",
        version="0.1.0",
        summary="Hyperparameter optimization service for dendritic neural networks",
        description="Launch, monitor, stop and export Optuna searches over dendritic models "
        "under a parameter budget. The live page is at /, the Optuna dashboard at /dashboard.",
        # Our own docs routes (add_docs): FastAPI's load their assets from a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.snapshots = Snapshots(max_age=settings.snapshot_max_age)

    def _db_down_response(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc.__class__.__name__)
        return JSONResponse({"detail": _DB_DOWN}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                            headers={"Retry-After": "5"})

    @app.exception_handler(studies.StorageError)
    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    @app.exception_handler(sa.exc.DBAPIError)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        return _db_down_response(request, exc)

    @app.exception_handler(optuna.exceptions.StorageInternalError)
    async def _storage_internal(request: Request, exc: Exception) -> JSONResponse:
        # Optuna wraps a lost connection in its own error: that is the database being down.
        if db_unreachable(exc):
            return _db_down_response(request, exc)
        log.error("storage error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error; the server log has the details"},
                            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)

    @app.exception_handler(studies.SpecError)
    async def _spec(request: Request, exc: studies.SpecError) -> JSONResponse:
        return JSONResponse(
            {"detail": [{"loc": ["body", *exc.field.split(".")], "msg": exc.message, "type": "value_error"}]},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Not FastAPI's default: that reports the spec's cross-field errors at the body's
        # root and echoes the whole request back.
        items = spec_error_items(exc.errors(), root=("body",))
        for item in items:
            if item["loc"] == ["path", "name"]:
                item["msg"] = _NAME_RULE
        return JSONResponse({"detail": items}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The trace goes to the server log (uvicorn writes it), never to the client.
        return JSONResponse({"detail": "internal error; the server log has the details"},
                            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)

    app.include_router(health.router)
    app.include_router(studies_routes.router)
    app.include_router(workers.router)
    add_docs(app)
    add_page(app, dashboard=dashboard)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    @app.api_route("/v1", methods=methods, include_in_schema=False)
    @app.api_route("/v1/{rest:path}", methods=methods, include_in_schema=False)
    def _no_endpoint(request: Request) -> JSONResponse:
        # Without this, what our routes do not match under /v1 (a name with a '/', a wrong
        # method) would reach the dashboard, whose errors are HTML pages.
        allowed = sorted(m.upper() for path, ops in app.openapi()["paths"].items()
                         if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", path), request.url.path)
                         for m in ops)
        if allowed:
            return JSONResponse({"detail": f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"},
                                status_code=status.HTTP_405_METHOD_NOT_ALLOWED,
                                headers={"Allow": ", ".join(allowed)})
        return JSONResponse({"detail": f"no endpoint {request.url.path}; see {DOCS_URL}"},
                            status_code=status.HTTP_404_NOT_FOUND)

    if dashboard:
        from a2wsgi import WSGIMiddleware
        from optuna_dashboard import wsgi as dashboard_wsgi

        # The dashboard's WSGI app expects the site root (/dashboard, /api/...): mounted
        # last, it only sees what our routes did not match.
        wsgi_app: Any = None

        async def _dashboard(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal wsgi_app
            if wsgi_app is None:
                wsgi_app = WSGIMiddleware(dashboard_wsgi(storage()))
            await wsgi_app(scope, receive, send)

        app.mount("/", _DashboardGuard(_dashboard, settings))

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_ServerTiming)
    app.openapi = lambda: _with_limits(app, settings)  # type: ignore[method-assign]
    return app


def _with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI schema with this server's limits and the API's own rules written in.

    A study launched through the API needs a name (a URL path segment, so the pattern) and a
    parameter budget, and its counts are bounded by the settings: clients (and schemathesis)
    read the real limits from the schema. The routes still check them, naming the limit.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         description=app.description, routes=app.routes)
    spec = schema["components"]["schemas"]["StudySpec"]
    props = spec["properties"]
    props["name"] = {**{k: v for k, v in props["name"].items() if k != "anyOf"}, "type": "string",
                     "pattern": studies.NAME_PATTERN, "minLength": 1, "maxLength": 64}
    props["max_params"] = {**{k: v for k, v in props["max_params"].items() if k != "anyOf"},
                           "type": "integer", "minimum": 1, "maximum": settings.max_params}
    props["n_trials"]["maximum"] = settings.max_trials
    props["n_epochs"]["maximum"] = settings.max_epochs
    spec["required"] = sorted({*spec.get("required", []), "name", "max_params"})
    for param in schema["paths"]["/v1/studies/{name}/trials"]["get"]["parameters"]:
        if param["name"] == "limit":
            param["schema"] = {"type": "integer", "minimum": 1, "maximum": settings.max_page_size,
                               "description": param["schema"].get("description", "")}
    schema["paths"]["/v1/studies"]["post"]["responses"]["400"] = {
        "description": "The body is not JSON",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    app.openapi_schema = schema
    return schema

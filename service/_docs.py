"""The interactive API docs (Swagger UI at /v1/docs, ReDoc at /v1/redoc), served without a CDN."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["DOCS_URL", "REDOC_URL", "add_docs"]

DOCS_URL = "/v1/docs"
REDOC_URL = "/v1/redoc"
#: Swagger UI 5 (Apache-2.0) and ReDoc 2 (MIT) as the fastapi-offline wheel (MIT) ships them
_ASSETS = "/assets/docs"
#: Nothing but this server: ReDoc's sidebar would fetch Redocly's logo from its CDN (the
#: image hides itself when blocked), and Swagger UI's "try it out" only calls this API.
_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:")


def add_docs(app: FastAPI) -> None:
    """Add the docs pages and their assets to ``app`` (made with ``docs_url=None, redoc_url=None``).

    FastAPI's own pages load their JS and CSS from a CDN, so they are blank on a machine
    without internet; these load them from the installed package.
    """
    app.mount(_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    title = app.title

    def _openapi_url(request: Request) -> str:
        assert app.openapi_url is not None
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get(DOCS_URL, include_in_schema=False)
    def _swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=_openapi_url(request),
            title=f"{title} - API docs",
            swagger_js_url=f"{root}{_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{_ASSETS}/favicon.png",
            oauth2_redirect_url=None,
            # The validator badge would send the schema to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = _CSP
        return page

    @app.get(REDOC_URL, include_in_schema=False)
    def _redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=_openapi_url(request),
            title=f"{title} - API reference",
            redoc_js_url=f"{root}{_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = _CSP
        return page

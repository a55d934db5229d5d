"""Our page at the site root: studies, budgets, workers and accuracy against size, from the REST API."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["add_page"]

_STATIC = Path(__file__).with_name("static") / "page"
#: the page reads plotly.js from the installed plotly package: never from a CDN
_PLOTLY_JS = "/assets/vendor/plotly.min.js"


def add_page(app: FastAPI, *, dashboard: bool) -> None:
    """Serve the page at ``/`` and its assets under ``/assets`` (none of Optuna's dashboard's paths).

    The page is static HTML and JS that polls ``/v1/studies`` and ``/v1/workers``; it
    reveals nothing by itself, so it stays open when reads need the token (it asks for it).
    """
    html = (_STATIC / "index.html").read_text().replace("__DASHBOARD__", "true" if dashboard else "false")
    plotly_js = resources.files("plotly") / "package_data" / "plotly.min.js"
    app.mount("/assets/page", StaticFiles(directory=_STATIC), name="page-assets")

    @app.get(_PLOTLY_JS, include_in_schema=False)
    def _plotly() -> FileResponse:
        # Revalidated by ETag after an hour: a plotly upgrade shows up without a reload dance.
        return FileResponse(str(plotly_js), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=3600"})

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def _page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

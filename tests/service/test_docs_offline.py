"""The API docs (Swagger UI, ReDoc) load everything from the server itself: they work offline."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
from service_helpers import Api

CHROMIUM = Path("/usr/bin/chromium")
#: no network beyond loopback, no first-run or update traffic
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

#: what a machine without internet cannot reach: anything but loopback (and inline data)
OUTSIDE = re.compile(r"^(?!http://127\.0\.0\.1[:/]|data:|blob:).*")


def _asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.parametrize("path", ["/v1/docs", "/v1/redoc"])
def test_the_docs_pages_load_their_assets_from_this_server(sqlite_api: Api, path: str) -> None:
    r = sqlite_api.http.get(path)
    assert r.status_code == 200
    urls = _asset_urls(r.text)
    assert urls, r.text
    assert "googleapis" not in r.text and "cdn" not in r.text.lower(), r.text
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{path} loads {url} from elsewhere"
        asset = sqlite_api.http.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url


def _browser() -> object:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")


@pytest.mark.browser
def test_swagger_ui_and_redoc_render_in_chromium_with_no_outside_request(sqlite_api: Api) -> None:
    playwright = _browser()
    base = sqlite_api.base_url
    requested: list[str] = []
    #: what the page's own Content-Security-Policy stopped before it left the browser
    blocked: set[str] = set()
    with playwright.sync_playwright() as p:  # type: ignore[attr-defined]
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda req: requested.append(req.url))
            page.on("requestfailed", lambda req: req.failure == "csp" and blocked.add(req.url))
            # As on a machine without internet: anything not on loopback fails.
            page.route(OUTSIDE, lambda route: route.abort())

            page.goto(f"{base}/v1/docs")
            create = page.locator(".opblock-post .opblock-summary-path[data-path='/v1/studies']")
            create.wait_for(timeout=30_000)
            assert create.is_visible()
            assert page.locator(".opblock").count() >= 10, "every operation is listed"
            assert "dendro" in page.locator(".information-container .title").inner_text()

            page.goto(f"{base}/v1/redoc")
            page.get_by_text("Create a study from a spec").first.wait_for(timeout=30_000)
            assert not errors, errors
        finally:
            browser.close()
    assert requested
    outside = [u for u in requested if not u.startswith(("data:", "blob:")) and urlparse(u).hostname != "127.0.0.1"]
    # ReDoc always asks for Redocly's logo from a CDN; the docs pages' CSP stops that in the
    # browser (the image then hides itself), so nothing leaves the machine.
    assert not [u for u in outside if u not in blocked], outside

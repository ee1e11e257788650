"""A chat front end on another origin, in a real headless browser: the `openai` npm package
calling the server cross-origin (CORS, server.cors_allowed_origins) on the real models.

The page (tests/browser/client.html) is served by a small static server on another port, so
its origin differs from the API's, as a Next.js app on localhost:3000 would. It imports the
package's ESM build from tests/browser/node_modules, which `npm ci --prefix tests/browser`
installs (scripts/test.sh runs it; nothing of it is committed). Debian's chromium is driven by
Playwright for Python as in tests/test_web_ui.py (never `playwright install`).
"""

from __future__ import annotations

import functools
import http.server
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from test_web_ui import CHROMIUM, CHROMIUM_ARGS, sync_playwright, wait_until

from coolfusion.config import ServerConfig
from coolfusion.server.app import app_state, create_app
from coolfusion.server.testing import serve_in_thread

PAGES = Path(__file__).resolve().parent / "browser"
CLIENT = PAGES / "node_modules" / "openai" / "index.mjs"
KEY = "sesame"
GREEDY = {
    "model": "cool-fusion", "temperature": 0, "max_tokens": 24,
    "messages": [{"role": "system", "content": "You are a concise assistant."},
                 {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
}

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="Playwright for Python is not installed (pip install playwright)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"chromium not found at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(not CLIENT.is_file(), reason="the openai npm package is not installed: "
                       "npm ci --prefix tests/browser (scripts/test.sh runs it when npm is there)"),
]


@contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """Serve `directory` on a free loopback port (another origin than the API's); yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript"}

        def log_message(self, *args) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=site.serve_forever, name="static-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


@pytest.fixture(scope="module")
def front_end() -> Iterator[str]:
    with static_site(PAGES) as url:
        yield url


@pytest.fixture(scope="module")
def api(engine, front_end):
    """The real app, key-protected, that lets `front_end`'s pages call it."""
    return create_app(engine, ServerConfig(api_key=KEY, cors_allowed_origins=(front_end,)))


@pytest.fixture(scope="module")
def api_url(api) -> Iterator[str]:
    with serve_in_thread(api) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def open_client(browser):
    """open_client(site_url) -> a page of `site_url` with window.chat ready; fails on page errors."""
    context = browser.new_context()
    errors: list[str] = []

    def open_at(site: str):
        page = context.new_page()
        page.set_default_timeout(180_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(site + "/client.html")
        page.wait_for_function("window.clientReady === true", timeout=30_000)
        return page

    try:
        yield open_at
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def chat(page, api_url: str, body: dict, api_key: str = KEY) -> dict:
    return page.evaluate("args => window.chat(args)", {"baseURL": api_url + "/v1", "apiKey": api_key, "body": body})


def chat_posts(app) -> float:
    """POSTs the app has answered, on any route, whatever their status (preflights are OPTIONS)."""
    return sum(sample.value for family in app_state(app).metrics.requests.collect() for sample in family.samples
               if sample.name.endswith("_total") and sample.labels["method"] == "POST")


def test_the_openai_package_streams_a_fused_answer_cross_origin_equal_to_the_whole_answer(open_client, front_end, api_url):
    assert front_end.rsplit(":", 1)[1] != api_url.rsplit(":", 1)[1]  # two origins
    page = open_client(front_end)
    streamed = chat(page, api_url, {**GREEDY, "stream": True})
    whole = chat(page, api_url, GREEDY)
    assert "error" not in streamed and "error" not in whole, (streamed, whole)
    assert streamed["chunks"] > 1  # it arrived in pieces, as the fusion committed segments
    assert streamed["text"] == whole["text"] and streamed["text"].strip()
    assert streamed["finish_reason"] == whole["finish_reason"] in ("stop", "length")
    # ... and both are the answer an outside client on no origin at all gets
    direct = httpx.post(api_url + "/v1/chat/completions", json=GREEDY, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=300).json()
    assert direct["choices"][0]["message"]["content"] == whole["text"]


def test_a_wrong_key_is_a_401_the_page_can_read(open_client, front_end, api_url):
    result = chat(open_client(front_end), api_url, {**GREEDY, "max_tokens": 4}, api_key="wrong")
    assert result["error"]["status"] == 401 and result["error"]["name"] == "AuthenticationError"
    assert "Incorrect or missing API key" in result["error"]["message"]


def test_a_page_on_an_origin_not_allowed_is_stopped_by_the_browser_before_any_generation(
        open_client, front_end, api, api_url):
    posts_before = chat_posts(api)
    with static_site(PAGES) as elsewhere:
        result = chat(open_client(elsewhere), api_url, {**GREEDY, "max_tokens": 4})
    assert result["error"]["status"] is None and result["error"]["name"] == "APIConnectionError"
    assert chat_posts(api) == posts_before  # the preflight failed: the POST was never sent
    assert "text" in chat(open_client(front_end), api_url, {**GREEDY, "max_tokens": 2})
    # from the allowed origin it is sent, and counted (once the server has logged it, just after the last byte)
    assert wait_until(lambda: chat_posts(api) == posts_before + 1, 10)

"""The built-in chat page (coolfusion/server/static/) in a real headless browser, against the real models.

Debian's chromium driven by Playwright for Python (`apt-get install chromium`,
`pip install playwright`; never `playwright install`, which downloads a browser). Every test
gets a fresh browser profile, so localStorage (API key, settings) starts empty. The server is
the real app around the session's real engine, served on loopback by `serve_in_thread`.

Screenshots: runs/screenshots/chat.png and side-by-side.png (and copies in the test's tmp dir).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from coolfusion.config import ServerConfig
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread, sse_data

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = os.environ.get("COOLFUSION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "runs" / "screenshots"
SOURCES = ("smollm2-135m", "gemma3-270m")
SYSTEM = "You are a concise assistant."

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="Playwright for Python is not installed (pip install playwright)"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"chromium not found at {CHROMIUM} (apt-get install chromium)"),
]


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        yield url


@pytest.fixture()
def page(playwright, tmp_path):
    """A page in a fresh chromium profile; fails the test on any uncaught page error."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 800}, color_scheme="light",
    )
    page = context.pages[0] if context.pages else context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ---- helpers ------------------------------------------------------------------------------------


def open_page(page, url: str, *, temperature: str = "0", max_tokens: str = "24", system: str = SYSTEM) -> None:
    page.goto(url + "/")
    page.wait_for_selector(".pane select.model option", state="attached")
    page.fill("#system", system)
    page.locator("#temperature").fill(temperature)
    page.fill("#max-tokens", max_tokens)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_finished(page, pane: int = 0) -> str:
    meta = page.locator(f".pane[data-slot='{pane}'] .msg.assistant .meta").last
    page.wait_for_function(
        "el => !['streaming'].includes(el.dataset.status)", arg=meta.element_handle(), timeout=180_000)
    return meta.get_attribute("data-status")


def segments(page, pane: int = 0) -> list[dict]:
    """Every coloured segment of the pane's last answer: its text and who proposed it."""
    return page.eval_on_selector_all(
        f".pane[data-slot='{pane}'] .msg.assistant:last-child .seg",
        "els => els.map(e => ({text: e.textContent, by: e.dataset.by.split(' '), agreed: e.classList.contains('agreed'),"
        " colour: e.style.getPropertyValue('--c'), bg: e.style.getPropertyValue('--seg-bg')}))")


def tally(page, pane: int = 0) -> dict[str, int]:
    return page.eval_on_selector_all(
        f".pane[data-slot='{pane}'] .tally-item",
        "els => Object.fromEntries(els.map(e => [e.dataset.model, Number(e.querySelector('b').textContent)]))")


def api_stream(url: str, body: dict, headers: dict | None = None) -> list[dict]:
    """The same request as an outside client: every `fusion_step` of the stream."""
    steps = []
    with httpx.Client(base_url=url, timeout=300, headers=headers) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for data in sse_data(r.iter_lines()):
                if data != "[DONE]" and "fusion_step" in (chunk := json.loads(data)):
                    steps.append(chunk["fusion_step"])
    return steps


def winning(step: dict) -> dict:
    return next(c for c in step["candidates"] if step["winner"] in c["proposed_by"])


def shoot(page, tmp_path: Path, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(tmp_path / name))
    shutil.copyfile(tmp_path / name, SCREENSHOTS / name)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples whose labels include `labels`."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---- tests --------------------------------------------------------------------------------------


def test_the_page_streams_the_answer_the_api_gives_coloured_by_winner_with_candidates(page, base_url, tmp_path):
    prompt = "What is the capital of France? Answer in one sentence."
    expected = api_stream(base_url, {
        "model": "cool-fusion", "stream": True, "fusion": {"trace": True}, "temperature": 0, "top_p": 0.95,
        "max_tokens": 24, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
    })
    assert any(len(s["candidates"]) > 1 for s in expected), "this prompt should have a contested segment"

    open_page(page, base_url)
    page.select_option(".pane[data-slot='0'] select.model", "cool-fusion")
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, prompt)
    body = req.value.post_data_json
    assert body["stream"] is True and body["fusion"] == {"trace": True} and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}

    # Streamed: the first coloured segment shows while the answer is still being generated.
    page.wait_for_selector(".pane[data-slot='0'] .seg")
    assert page.get_attribute(".pane[data-slot='0'] .meta", "data-status") == "streaming"
    assert wait_finished(page) in ("stop", "length")

    segs = segments(page)
    shown = [s for s in expected if s["text"]]
    assert [s["text"] for s in segs] == [s["text"] for s in shown]
    assert [s["by"] for s in segs] == [winning(s)["proposed_by"] for s in shown]
    for seg, step in zip(segs, shown):
        if len(step["candidates"]) == 1 and len(seg["by"]) == 2:  # every model proposed it: mixed style
            assert seg["agreed"] and seg["bg"].startswith("linear-gradient")
        else:
            assert not seg["agreed"] and seg["colour"].startswith("var(--m")
    assert len({s["colour"] for s in segs if not s["agreed"] and s["by"] == ["smollm2-135m"]}) <= 1
    legend = page.inner_text("#legend")
    assert all(name in legend for name in SOURCES) and "agreed" in legend

    # The tally counts every segment once: wins per model, plus the agreed ones.
    counts = tally(page)
    assert sum(counts.values()) == len(segs)
    for name in SOURCES:
        assert counts.get(name, 0) == sum(1 for s in segs if not s["agreed"] and s["by"] == [name])
    assert counts.get("agreed", 0) == sum(1 for s in segs if s["agreed"])

    # Hovering a contested segment shows its candidates, every model's perplexity and the mean.
    # The last contested segment with visible text: its card leaves the answer in view.
    i = max(k for k, s in enumerate(shown) if len(s["candidates"]) > 1 and s["text"].strip())
    page.hover(f".pane[data-slot='0'] .seg >> nth={i}")
    pop = page.locator("#popover")
    pop.wait_for(state="visible")
    text = pop.inner_text()
    assert f"segment {i + 1}" in text and all(f"ppl {name}" in text for name in SOURCES) and "mean" in text
    rows = pop.locator("tbody tr")
    assert rows.count() == len(shown[i]["candidates"])
    means = [float(m) if m != "∞" else math.inf for m in pop.locator("td.mean").all_inner_texts()]
    win_mean = pop.locator("tr.win td.mean").inner_text()
    assert float(win_mean) == min(means)  # the starred row is the argmin of the mean
    assert abs(float(win_mean) - winning(shown[i])["mean_ppl"]) <= 0.01 * winning(shown[i])["mean_ppl"] + 0.01
    shoot(page, tmp_path, "chat.png")

    page.mouse.move(5, 790)  # away from the segment: the card goes
    pop.wait_for(state="hidden")
    page.click(f".pane[data-slot='0'] .seg >> nth={i}")  # a tap pins it
    pop.wait_for(state="visible")
    page.keyboard.press("Escape")
    pop.wait_for(state="hidden")


def test_stop_aborts_the_fetch_and_the_server_cancels_the_generation(page, base_url, engine):
    cancelled_before = metric(base_url, "coolfusion_generations_cancelled_total", reason="disconnect")
    open_page(page, base_url, max_tokens="300")
    send(page, "Write a long story about a dragon who learns to bake bread.")
    page.wait_for_function("document.querySelectorAll('.pane .seg').length >= 2", timeout=120_000)
    assert engine.active_requests == 1
    page.click("#stop")

    assert wait_until(lambda: engine.active_requests == 0, 10), "the engine kept generating after Stop"
    assert wait_finished(page) == "stopped"
    assert page.is_visible("#send") and not page.is_visible("#stop")
    n = len(segments(page))
    page.wait_for_timeout(1500)
    assert len(segments(page)) == n  # nothing more arrives
    assert metric(base_url, "coolfusion_generations_cancelled_total", reason="disconnect") == cancelled_before + 1


def test_side_by_side_sends_the_same_prompt_to_two_models_at_once(page, base_url, tmp_path):
    open_page(page, base_url, max_tokens="16")
    page.click("label.switch")
    page.wait_for_selector(".pane[data-slot='1'] select.model option", state="attached")
    page.select_option(".pane[data-slot='0'] select.model", "cool-fusion")
    page.select_option(".pane[data-slot='1'] select.model", "smollm2-135m")
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    send(page, "Name three colours.")
    for pane in (0, 1):
        assert wait_finished(page, pane) in ("stop", "length")

    assert sorted(b["model"] for b in bodies) == ["cool-fusion", "smollm2-135m"]
    assert bodies[0]["messages"] == bodies[1]["messages"]
    fused, single = segments(page, 0), segments(page, 1)
    assert fused and single
    assert all(s["by"] == ["smollm2-135m"] for s in single)  # a single model wins every segment
    assert tally(page, 1) == {"smollm2-135m": len(single)}
    assert all(set(s["by"]) <= set(SOURCES) for s in fused)
    assert sum(tally(page, 0).values()) == len(fused)
    page.hover(".pane[data-slot='1'] .seg >> nth=0")
    page.locator("#popover").wait_for(state="visible")
    shoot(page, tmp_path, "side-by-side.png")


def test_the_page_asks_for_the_api_key_and_shows_server_errors_plainly(page, engine, tmp_path):
    with serve_in_thread(create_app(engine, ServerConfig(api_key="sesame"))) as url:
        response = page.goto(url + "/")
        assert response.status == 200  # the page itself needs no key
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")  # /v1/models answered 401: the page asks
        error = page.locator("#key-error")
        assert "401" in error.inner_text() and "Incorrect or missing API key" in error.inner_text()

        page.fill("#api-key", "wrong")
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#key-dialog').open && "
                               "document.querySelector('#key-error').textContent.includes('401')")
        assert "401 Unauthorized" in page.inner_text("#banner")
        assert "invalid_api_key" in page.inner_text("#banner")

        page.fill("#api-key", "sesame")
        page.click("#key-save")
        page.wait_for_selector(".pane select.model option", state="attached")
        dialog.wait_for(state="hidden")
        assert page.is_hidden("#banner")

        # A request the server refuses shows its status and message in the conversation.
        page.fill("#max-tokens", "8192")
        with page.expect_request("**/v1/chat/completions") as req:
            send(page, "Hello")
        assert req.value.headers["authorization"] == "Bearer sesame"
        assert wait_finished(page) == "error"
        err = page.locator(".msg.assistant .error").last
        assert err.get_attribute("data-status") == "400"
        assert "400 Bad Request" in err.inner_text() and "context limit" in err.inner_text()

        # The key was kept: a reload needs no prompt, and a normal request goes through.
        page.reload()
        page.wait_for_selector(".pane select.model option", state="attached")
        assert not dialog.is_visible()
        page.fill("#max-tokens", "4")
        send(page, "Hi")
        assert wait_finished(page) in ("stop", "length")
        assert segments(page)

"""Load, faults and lifecycle: admission (429), timeouts, disconnects, shutdown, metrics, logs.

Real uvicorn on loopback around a slow fake engine (a fixed delay per segment), so that
"mid-stream" and "while another request runs" are real situations, not mocks.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from fakes import FakeEngine, words
from prometheus_client.parser import text_string_to_metric_families

from coolfusion.config import ServerConfig
from coolfusion.core.types import GenerationRequest
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread, sse_data

SEGMENT_S = 0.05


def slow_engine(**kw) -> FakeEngine:
    return FakeEngine(delay_s=SEGMENT_S, filler_words=kw.pop("filler_words", 200), **kw)


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def metric(base_url: str, name: str, **labels) -> float:
    """The value of one sample of /metrics (0.0 when absent)."""
    text = httpx.get(base_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


class StreamReader:
    """Reads one SSE stream in a background thread; `events` fills as chunks arrive."""

    def __init__(self, url: str, path: str, body: dict):
        self.events: list = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, path, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, path: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                self.status = r.status_code
                for data in sse_data(r.iter_lines()):
                    self.events.append(data if data == "[DONE]" else json.loads(data))
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()

    def wait_for_events(self, n: int, timeout_s: float = 10.0) -> None:
        assert wait_until(lambda: len(self.events) >= n or self.done.is_set(), timeout_s)
        assert len(self.events) >= n, (self.status, self.events, self.error)

    def join(self, timeout_s: float = 30.0) -> None:
        assert self.done.wait(timeout_s), "stream did not end"


# ---- admission control ------------------------------------------------------------------------


def test_beyond_max_concurrent_plus_max_queue_requests_get_429_with_retry_after():
    engine = slow_engine(filler_words=20)
    app = create_app(engine, ServerConfig(max_concurrent=1, max_queue=1))
    with serve_in_thread(app) as url:
        running = StreamReader(url, "/v1/completions", {"prompt": "first", "stream": True})
        running.wait_for_events(1)
        queued = StreamReader(url, "/v1/completions", {"prompt": "second", "stream": True})
        assert wait_until(lambda: metric(url, "coolfusion_queue_depth") == 1)
        assert metric(url, "coolfusion_slots_in_use") == 1
        r = httpx.post(url + "/v1/completions", json={"prompt": "third"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
        # the queued request is not hurt: it runs once the slot frees, with the right output
        running.join()
        queued.join()
        assert queued.status == 200 and queued.events[-1] == "[DONE]"
        expected = engine.expected_text(GenerationRequest(prompt="second", max_tokens=64))
        assert "".join(e["choices"][0]["text"] for e in queued.events[:-1]) == expected
        assert metric(url, "coolfusion_rejected_total", reason="rate_limit_exceeded") == 1
        assert metric(url, "coolfusion_queue_depth") == 0
        assert metric(url, "coolfusion_slots_in_use") == 0


def test_a_request_that_waits_in_the_queue_past_its_timeout_gets_503_queue_timeout():
    # one segment takes 1 s, so the first request holds the only slot past everyone's deadline
    engine = FakeEngine(delay_s=1.0, filler_words=2)
    app = create_app(engine, ServerConfig(max_concurrent=1, max_queue=4, request_timeout_s=0.5))
    with serve_in_thread(app) as url:
        blocker = StreamReader(url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hog"}], "stream": True})
        blocker.wait_for_events(1)  # the role chunk: it holds the slot now
        r = httpx.post(url + "/v1/completions", json={"prompt": "waits"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in r.headers
        blocker.join()


# ---- timeouts ---------------------------------------------------------------------------------


def test_request_timeout_ends_a_generation_early_with_length_and_frees_the_engine():
    engine = slow_engine()
    app = create_app(engine, ServerConfig(request_timeout_s=0.4))
    with serve_in_thread(app) as url:
        t0 = time.monotonic()
        body = httpx.post(url + "/v1/completions", json={"prompt": "slow", "max_tokens": 500}, timeout=10).json()
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0  # the full reply would take 200 x 50 ms = 10 s
        assert body["choices"][0]["finish_reason"] == "length"
        text = body["choices"][0]["text"]
        assert 0 < len(words(text)) < 200  # partial output, the part generated in time
        assert body["usage"]["completion_tokens"] == len(words(text))
        assert wait_until(lambda: engine.active_requests == 0, 2)
        assert engine.outcomes[-1] in ("cancelled", "closed")


def test_request_timeout_ends_a_stream_with_a_length_chunk_and_done():
    engine = slow_engine()
    with serve_in_thread(create_app(engine, ServerConfig(request_timeout_s=0.4))) as url:
        reader = StreamReader(url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "slow"}], "stream": True, "max_tokens": 500})
        reader.join(10)
        assert reader.events[-1] == "[DONE]"
        finishes = [e["choices"][0]["finish_reason"] for e in reader.events[:-1]]
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        assert wait_until(lambda: engine.active_requests == 0, 2)


# ---- cancellation -----------------------------------------------------------------------------


def test_client_disconnect_mid_stream_stops_the_engine_within_a_segment_and_frees_the_slot():
    engine = slow_engine()
    total = len(words(engine.reply(GenerationRequest(prompt="go away"))))
    app = create_app(engine, ServerConfig(max_concurrent=1, max_queue=0))
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "go away", "stream": True,
                                                                  "max_tokens": 500}) as r:
            events = sse_data(r.iter_lines())
            for _ in range(3):
                next(events)
            assert engine.active_requests == 1
        closed_at = time.monotonic()  # leaving the block closed the connection
        assert wait_until(lambda: engine.active_requests == 0, 2)
        assert time.monotonic() - closed_at < 2.0  # the rest of the reply would take ~10 s
        assert engine.outcomes == ["cancelled"] or engine.outcomes == ["closed"]
        assert engine.segments_produced < 3 + 10 < total
        assert metric(url, "coolfusion_generations_cancelled_total", reason="disconnect") == 1
        # with one slot and no queue, this would be a 429 if the slot had leaked
        assert wait_until(lambda: metric(url, "coolfusion_slots_in_use") == 0, 2)
        assert httpx.post(url + "/v1/completions", json={"prompt": "next", "max_tokens": 2}).status_code == 200


def test_client_disconnect_during_a_non_streamed_request_cancels_its_generation():
    engine = slow_engine()
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "impatient", "max_tokens": 500}, timeout=0.3)
        assert wait_until(lambda: engine.active_requests == 0, 2)
        assert engine.outcomes in (["cancelled"], ["closed"])
        assert engine.segments_produced < 30


# ---- isolation under faults -------------------------------------------------------------------


def test_a_broken_request_does_not_affect_a_concurrent_good_one():
    engine = FakeEngine(delay_s=0.02, filler_words=30)
    with serve_in_thread(create_app(engine, ServerConfig(max_body_bytes=2000))) as url:
        good = StreamReader(url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "good one"}], "stream": True})
        good.wait_for_events(2)
        bad = StreamReader(url, "/v1/completions", {"prompt": "EXPLODE", "stream": True})
        statuses = [
            httpx.post(url + "/v1/completions", json={"prompt": "WORKERFAIL"}).status_code,
            httpx.post(url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}).status_code,
            httpx.post(url + "/v1/completions", json={"prompt": "x" * 5000}).status_code,
            httpx.post(url + "/v1/completions", json={"prompt": "x", "model": "nope"}).status_code,
        ]
        _raw_garbage(url)
        bad.join()
        good.join()
        assert statuses == [500, 400, 413, 404]
        assert "error" in bad.events[-2] and bad.events[-1] == "[DONE]"
        assert metric(url, "coolfusion_stream_errors_total", code="internal_error") == 1
        expected = engine.expected_text(GenerationRequest(messages=good_messages(), max_tokens=64))
        assert good.status == 200 and good.events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in good.events[:-1]) == expected
        assert wait_until(lambda: engine.active_requests == 0, 2)
        assert httpx.get(url + "/health").status_code == 200


def good_messages():
    from coolfusion.core.types import Message

    return (Message("user", "good one"),)


def _raw_garbage(url: str) -> None:
    """A client that sends a broken HTTP request and hangs up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"pro")


# ---- graceful shutdown ------------------------------------------------------------------------


def test_shutdown_ends_an_open_stream_with_an_in_band_error_and_done_and_frees_the_engine():
    engine = slow_engine()
    app = create_app(engine, ServerConfig(shutdown_grace_s=0.3))
    with serve_in_thread(app) as url:
        reader = StreamReader(url, "/v1/completions", {"prompt": "long one", "stream": True, "max_tokens": 500})
        reader.wait_for_events(2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3.0  # nothing hangs
    reader.join(5)
    assert reader.events[-1] == "[DONE]"
    assert reader.events[-2]["error"]["code"] == "server_shutting_down"
    assert all("choices" in e for e in reader.events[:-2])
    assert wait_until(lambda: engine.active_requests == 0, 2)


def test_shutdown_lets_a_generation_that_finishes_within_the_grace_period_complete():
    engine = FakeEngine(delay_s=SEGMENT_S, filler_words=4)
    app = create_app(engine, ServerConfig(shutdown_grace_s=5))
    with serve_in_thread(app) as url:
        reader = StreamReader(url, "/v1/completions", {"prompt": "short", "stream": True})
        reader.wait_for_events(1)
    reader.join(5)
    assert reader.events[-1] == "[DONE]"
    assert reader.events[-2]["choices"][0]["finish_reason"] == "stop"


# ---- metrics and logs -------------------------------------------------------------------------


def test_metrics_count_requests_segments_wins_tokens_and_step_latency():
    engine = FakeEngine()
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        body = httpx.post(url + "/v1/completions", json={"prompt": "count my words", "max_tokens": 9}).json()
        httpx.post(url + "/v1/completions", json={"prompt": "x", "model": "nope"})
        k = body["usage"]["completion_tokens"]
        assert k == 5  # "cool-fusion| heard:| words| my| count."
        m = lambda name, **labels: metric(url, name, **labels)  # noqa: E731
        assert m("coolfusion_requests_total", route="/v1/completions", status="200") == 1
        assert m("coolfusion_requests_total", route="/v1/completions", status="404") == 1
        assert m("coolfusion_segments_total", model="cool-fusion") == k
        assert m("coolfusion_segment_wins_total", model="cool-fusion", winner="alpha") == 3
        assert m("coolfusion_segment_wins_total", model="cool-fusion", winner="beta") == 2
        assert m("coolfusion_completion_tokens_total", model="cool-fusion") == k
        assert m("coolfusion_prompt_tokens_total", model="cool-fusion") == 3
        assert m("coolfusion_step_latency_seconds_count", model="cool-fusion") == k
        assert m("coolfusion_generations_total", model="cool-fusion", outcome="finished") == 1
        assert m("coolfusion_active_generations") == 0
        assert m("coolfusion_queue_depth") == 0
        assert m("coolfusion_engine_ready") == 1


def test_metrics_registry_is_per_app():
    a, b = create_app(FakeEngine(), ServerConfig()), create_app(FakeEngine(), ServerConfig())
    with serve_in_thread(a) as url_a, serve_in_thread(b) as url_b:
        httpx.post(url_a + "/v1/completions", json={"prompt": "only a"})
        assert metric(url_a, "coolfusion_requests_total", route="/v1/completions") == 1
        assert metric(url_b, "coolfusion_requests_total", route="/v1/completions") == 0


def test_each_request_logs_one_structured_line_with_its_request_id(caplog):
    caplog.set_level(logging.INFO, logger="coolfusion.access")
    with serve_in_thread(create_app(FakeEngine(), ServerConfig())) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "log me", "stream": True},
                       headers={"X-Request-Id": "req-42"})
        assert r.headers["x-request-id"] == "req-42"
        r2 = httpx.post(url + "/v1/completions", json={"prompt": "no id"})
        generated = r2.headers["x-request-id"]
        assert generated and generated != "req-42"
    lines = [rec.fields for rec in caplog.records if rec.name == "coolfusion.access"]
    mine = [f for f in lines if f["request_id"] == "req-42"]
    assert len(mine) == 1
    line = mine[0]
    assert line["status"] == 200 and line["path"] == "/v1/completions" and line["stream"] is True
    assert line["model"] == "cool-fusion" and line["prompt_tokens"] == 2 and line["finish_reason"] == "stop"
    assert line["completion_tokens"] > 0 and line["duration_ms"] >= 0
    assert [f["request_id"] for f in lines].count(generated) == 1

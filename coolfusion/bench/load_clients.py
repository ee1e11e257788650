"""The client side of the load test (coolfusion/bench/load_test.py): the plan of clients, one
client's request (streamed or not, optionally hanging up after its first chunk), and the
server-side readings it takes: RSS of a process and sums of /metrics samples.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from coolfusion.extras import require
from coolfusion.server.testing import sse_data

httpx = require("httpx", "bench")

PROMPTS = (
    "The capital of France is",
    "Write one short sentence about the sea.",
    "def fibonacci(n):",
    "List three primary colours:",
)

Endpoint = Literal["completions", "chat"]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


# ---- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    index: int
    endpoint: Endpoint
    stream: bool
    disconnect: bool  # hang up right after the first content chunk (stream clients only)
    prompt: str

    @property
    def key(self) -> tuple[str, str]:
        """The reference this client is compared with (stream or not: the same text)."""
        return (self.endpoint, self.prompt)

    @property
    def kind(self) -> str:
        mode = "stream" if self.stream else "plain"
        return f"{self.endpoint}/{mode}" + ("/disconnect" if self.disconnect else "")


def plan_clients(n: int, prompts: tuple[str, ...] = PROMPTS, disconnect_fraction: float = 0.25) -> list[ClientSpec]:
    """Client i: endpoint i % 2, streamed when i % 4 >= 2, prompt (i // 4) % len(prompts), so
    each block of four clients sends one prompt in all four endpoint x mode combinations.
    round(n * disconnect_fraction) stream clients hang up mid-stream, alternating endpoints."""
    if n <= 0 or not prompts:
        raise ValueError("need at least one client and one prompt")
    kinds = [("chat" if i % 2 else "completions", i % 4 >= 2, prompts[(i // 4) % len(prompts)]) for i in range(n)]
    streams = [i for i in range(n) if kinds[i][1]]
    # positions 2,3, 6,7, ... of the stream clients first, then 0,1, 4,5, ...: both endpoints
    order = [p for p in range(len(streams)) if (p // 2) % 2 == 1] + [p for p in range(len(streams)) if (p // 2) % 2 == 0]
    n_disc = min(len(streams), round(n * disconnect_fraction))
    hang_up = {streams[p] for p in order[:n_disc]}
    return [ClientSpec(i, e, s, i in hang_up, p) for i, (e, s, p) in enumerate(kinds)]


# ---- one request --------------------------------------------------------------------------------


@dataclass
class Outcome:
    spec: ClientSpec | None
    status: int | None = None  # the last HTTP status (after 429 retries)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    done: bool = False  # stream: got [DONE]
    in_band_error: dict | None = None
    disconnected: bool = False  # hung up on purpose
    retries_429: int = 0
    retry_after: str | None = None  # of the last 429
    error: str | None = None  # transport error or unparsable response
    seconds: float = 0.0  # send -> last byte (or hang-up), retries included

    @property
    def finished(self) -> bool:
        return not self.disconnected and self.error is None and self.status == 200 and self.in_band_error is None


def _body(endpoint: Endpoint, prompt: str, *, stream: bool, max_tokens: int, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _text_of(endpoint: Endpoint, choice: dict[str, Any], stream: bool) -> str:
    if endpoint == "completions":
        return choice.get("text") or ""
    part = choice.get("delta" if stream else "message") or {}
    return part.get("content") or ""


def send(
    http: httpx.Client,
    endpoint: Endpoint,
    prompt: str,
    *,
    stream: bool,
    max_tokens: int,
    model: str,
    disconnect: bool = False,
    max_retries: int = 5,
    max_wait_s: float = 10.0,
    spec: ClientSpec | None = None,
) -> Outcome:
    """One request; 429s are retried after Retry-After (capped at max_wait_s), at most max_retries times."""
    out = Outcome(spec)
    body = _body(endpoint, prompt, stream=stream, max_tokens=max_tokens, model=model)
    t0 = time.perf_counter()
    try:
        for attempt in range(max_retries + 1):
            if stream:
                _stream_once(http, endpoint, body, disconnect, out)
            else:
                r = http.post(PATHS[endpoint], json=body)
                out.status = r.status_code
                if r.status_code == 200:
                    data = r.json()
                    choice = data["choices"][0]
                    out.text = _text_of(endpoint, choice, stream=False)
                    out.finish_reason = choice.get("finish_reason")
                    out.completion_tokens = data["usage"]["completion_tokens"]
                elif r.status_code == 429:
                    out.retry_after = r.headers.get("retry-after")
            if out.status != 429 or attempt == max_retries:
                break
            out.retries_429 += 1
            wait = out.retry_after or "1"
            time.sleep(min(max_wait_s, float(wait) if wait.replace(".", "", 1).isdigit() else 1.0))
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as err:
        out.error = f"{type(err).__name__}: {err}"
    out.seconds = time.perf_counter() - t0
    return out


def _stream_once(http: httpx.Client, endpoint: Endpoint, body: dict, disconnect: bool, out: Outcome) -> None:
    out.text, out.done, out.in_band_error, out.finish_reason, out.completion_tokens = "", False, None, None, None
    with http.stream("POST", PATHS[endpoint], json=body) as r:
        out.status = r.status_code
        if r.status_code == 429:
            out.retry_after = r.headers.get("retry-after")
            r.read()
            return
        if r.status_code != 200:
            r.read()
            return
        for data in sse_data(r.iter_lines()):
            if data == "[DONE]":
                out.done = True
                break
            event = json.loads(data)
            if "error" in event:
                out.in_band_error = event["error"]
                continue
            if event.get("usage"):
                out.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = _text_of(endpoint, choice, stream=True)
                out.text += piece
                if choice.get("finish_reason") is not None:
                    out.finish_reason = choice["finish_reason"]
                if disconnect and piece:
                    out.disconnected = True
                    return  # leaving the block closes the connection mid-stream
        # the stream ended without our hanging up (e.g. the answer was one segment long)


# ---- server-side figures ---------------------------------------------------------------------------


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size of a process (this one by default), from /proc or psutil."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:
        return None


class PeakSampler:
    """Samples a process's RSS every `interval_s` in a thread; `.peak` is the largest seen."""

    def __init__(self, pid: int | None, interval_s: float = 0.02):
        self.pid, self.interval_s = pid, interval_s
        self.peak = rss_bytes(pid) or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes(self.pid) or 0)


def scrape(http: httpx.Client) -> dict[str, float]:
    """Sums of the /metrics samples we report, by sample name (labels summed over)."""
    wanted = {"coolfusion_segments_total", "coolfusion_completion_tokens_total", "coolfusion_active_generations",
              "coolfusion_slots_in_use", "coolfusion_queue_depth", "coolfusion_generations_cancelled_total"}
    out = dict.fromkeys(wanted, 0.0)
    r = http.get("/metrics")
    r.raise_for_status()
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name in wanted:
                out[s.name] += s.value
    return out


def wait_idle(http: httpx.Client, engine: Any | None, timeout_s: float) -> bool:
    """Until the server has no running generation, slot in use or queued request (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(http)
        idle = (m["coolfusion_active_generations"] == 0 and m["coolfusion_slots_in_use"] == 0
                and m["coolfusion_queue_depth"] == 0)
        if engine is not None:
            idle = idle and getattr(engine, "active_requests", 0) == 0
        if idle or time.monotonic() > deadline:
            return idle
        time.sleep(0.05)

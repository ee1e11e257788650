"""`coolfusion serve` with `backend: ray` and no cluster address, run as a user runs it (a
subprocess): the Ray instance it starts itself lives as long as the server (issue 26: it died
with the loader thread, and Ray ended the server 60 s later), and when its head is killed the
server stays up, answering 503 `engine_not_ready` with the reason (coolfusion/workers/ray_cluster.py).

One server serves both tests (the kill test last). The conftest starts it once the first
real engine of the session has loaded (tests/ray_serve.py), so its start and the 90 s the first test waits
after /health first answers 200 pass while the other tests run; the 70 s the second waits
after the kill (past the 60 s after which Ray's driver would end the process) remain. Run
alone, the module takes four to five minutes on a 2-core machine. Marked slow
(`-m "not slow"` leaves them out).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time

import httpx
import pytest
import ray_serve
from conftest import RAY_SERVER

from coolfusion.core.types import COOL, GenerationRequest
from coolfusion.server.testing import sse_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install '.[ray]')"),
]

READY_FOR_S = 90  # how long after /health first answers 200 the first request is sent
PAST_GCS_EXIT_S = 70  # Ray's driver ends its process 60 s after its GCS stops answering
PROMPT = "The capital of France is"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def ray_server(request):
    """The server the conftest started early (conftest.EarlyRayServer), or a new one."""
    server = request.config.stash[RAY_SERVER].take()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _complete(server: ray_serve.Server) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", timeout=120,
                      json={"model": COOL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})


def test_a_self_started_ray_instance_outlives_the_loader_and_serves_the_local_backends_text(ray_server, engine):
    local = "".join(s.text for s in engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=MAX_TOKENS)))
    time.sleep(max(0.0, ray_server.first_200 + READY_FOR_S - time.monotonic()))
    assert ray_server.proc.poll() is None, ray_server.log.read_text()[-3000:]
    assert set(ray_server.head_processes()) == {"gcs_server", "raylet"}
    assert httpx.get(ray_server.url + "/health", timeout=10).status_code == 200
    r = _complete(ray_server)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == local and local


def test_a_killed_ray_head_gives_503_with_the_reason_and_a_logged_error_not_an_exit(ray_server):
    heads = ray_server.head_processes()
    assert set(heads) == {"gcs_server", "raylet"}
    events = []
    with httpx.stream("POST", ray_server.url + "/v1/completions", timeout=60,
                      json={"model": COOL, "prompt": "Tell me a long story about a dragon:", "max_tokens": 400,
                            "stream": True}) as stream:
        for data in sse_data(stream.iter_lines()):  # a request in flight when the head dies
            events.append(data)
            if len(events) == 1:
                for pid in heads.values():
                    os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
    assert time.monotonic() - killed < 30  # the stream ended, it did not hang
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_not_ready"
    while time.monotonic() < killed + 30:  # the watch notices within seconds
        health = httpx.get(ray_server.url + "/health", timeout=10)
        if health.status_code == 503:
            break
        time.sleep(0.5)
    assert health.status_code == 503
    assert health.json()["status"] == "error" and "Ray cluster is lost" in health.json()["error"]
    assert "gcs_server" in health.json()["error"] or "raylet" in health.json()["error"]

    time.sleep(max(0.0, killed + PAST_GCS_EXIT_S - time.monotonic()))
    assert ray_server.proc.poll() is None, ray_server.log.read_text()[-3000:]  # Ray did not end it
    t0 = time.monotonic()
    r = _complete(ray_server)
    assert time.monotonic() - t0 < 30  # answered, not hung
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"
    assert "Ray cluster is lost" in r.json()["error"]["message"]
    assert httpx.get(ray_server.url + "/health", timeout=10).json() == health.json()
    errors = [x for x in ray_server.log_lines() if x["level"] == "error" and x["logger"] == "coolfusion.ray"]
    assert len(errors) == 1 and "Ray cluster is lost" in errors[0]["msg"], errors
    assert "The program will terminate" not in ray_server.log.read_text()

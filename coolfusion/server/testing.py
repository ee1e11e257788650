"""Test helper: a real uvicorn server on a free loopback port, in a background thread.

    with serve_in_thread(create_app(engine, settings)) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x")

Leaving the block shuts the server down gracefully (see coolfusion.server.uvicorn_server) and joins it.
`sse_data(lines)` turns a stream's text lines into its `data:` payloads, one per event.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

from fastapi import FastAPI

from coolfusion.server.uvicorn_server import make_server


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", *, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve `app` until the block ends; yields the base URL, e.g. "http://127.0.0.1:38211"."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = make_server(app, host, port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="coolfusion-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=server.config.timeout_graceful_shutdown or 30)
        sock.close()


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data:` payload of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)

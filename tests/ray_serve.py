"""The `backend: ray` server of tests/test_ray_lifetime.py: `python -m coolfusion.server`
(= `coolfusion serve`) on config.yaml plus `backend: ray` and no cluster address, run as a
user runs it, in its own process group.

`start()` returns at once; a thread notes when /health first answers 200. The conftest
(`EarlyRayServer`) starts it once the session's first real engine has loaded, so the 90 s
that the lifetime test must wait after that moment pass while the rest of the suite runs;
the test's fixture takes it over (or starts one itself when run alone), and `stop()` ends it
at the latest when the session does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> dict[str, int]:
    """{command name: pid} of the processes whose parent is `pid` (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found[name] = int(stat.parent.name)
    return found


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, tmp: Path):
        self.proc, self.url, self.tmp, self.log = proc, url, tmp, tmp / "server.log"
        self.first_200: float | None = None  # time.monotonic() when /health first answered 200
        self._watch = threading.Thread(target=self._wait_ready, name="ray-serve-health", daemon=True)
        self._watch.start()

    def _wait_ready(self) -> None:
        while self.first_200 is None and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.first_200 = time.monotonic()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until /health has answered 200; fails with the server's log if it exits first."""
        deadline = time.monotonic() + timeout_s
        while self.first_200 is None:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server was not ready within {timeout_s:.0f} s"
            time.sleep(0.5)

    def log_lines(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]

    def head_processes(self) -> dict[str, int]:
        kids = _children(self.proc.pid)
        return {name: kids[name] for name in ("gcs_server", "raylet") if name in kids}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start() -> Server:
    tmp = Path(tempfile.mkdtemp(prefix="coolfusion-ray-serve-"))
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data["backend"] = "ray"
    assert "ray" not in data  # no address: the server starts its own Ray instance
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with (tmp / "server.log").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "coolfusion.server", "--config", str(cfg), "--port", str(port)],
                                cwd=tmp, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    return Server(proc, f"http://127.0.0.1:{port}", tmp)

"""This process's Ray connection for `backend: ray`: where `ray.init` runs, and the watch
that notices when the cluster is gone (docs/ray.md, "Starting Ray and losing it").

Where `ray.init` runs. In one thread of its own, `coolfusion-ray`, that lives as long as
the process, whoever asks for the connection (the server's loader thread, a benchmark, a
test). A Ray instance that `ray.init` starts itself (no `ray.address`, or "local") runs its
head processes (gcs_server, raylet, ...) with PR_SET_PDEATHSIG, and Linux sends that signal
when the *thread* that started them exits, not the process: started from the server's
loader thread, the cluster died as soon as the models were loaded, and Ray ended the server
60 s later (issue 26). Not the main thread either: there uvicorn runs, and `ray.init` would
install Ray's SIGTERM handlers, which uvicorn re-raises after its graceful shutdown (the
process then exits 1 before the engine is closed); and the server would only start
listening once the head had started. For `address: auto` or `ray://` the thread changes
nothing (no process is started).

The watch. The same thread then checks the cluster every `WATCH_S` seconds: the head
processes this process started (gcs_server, raylet; none when it joined a cluster) must be
running, and the GCS must answer within `PROBE_TIMEOUT_S`. When a check fails, `lost` says
why and one error is logged; the Ray workers answer every call with NotReady (HTTP 503
`engine_not_ready`), a call in flight included, and /health reports the reason. If the GCS
answers again (a cluster with GCS fault tolerance), `lost` clears. A head this process
started does not come back by itself, and nothing here restarts it: the server stays up,
answering 503 with the reason, until it is restarted (see docs/ray.md for why).

Ray's driver ends its process with std::_Exit once the GCS has not answered for
`gcs_rpc_server_reconnect_timeout_s` (60 s by default; "Failed to connect to GCS within 60
seconds ... The program will terminate"), from a C++ thread Python cannot intercept.
`connect` raises that limit for this process (env RAY_gcs_rpc_server_reconnect_timeout_s,
unless it is set already), so a lost cluster is reported by the server instead of ending it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from coolfusion.config import RayConfig
from coolfusion.core.errors import ConfigError, NotReady

log = logging.getLogger("coolfusion.ray")

WATCH_S = 2.0  # between two checks of the cluster; also how often a waiting call looks at `lost`
PROBE_TIMEOUT_S = 5.0  # the GCS must answer a probe within this
HEAD_PROCESSES = ("gcs_server", "raylet")  # the head processes whose exit loses the cluster
GCS_EXIT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"  # Ray's driver _Exits after this many s without GCS
NO_GCS_EXIT_S = 10 * 365 * 24 * 3600  # ... raised to ten years: the watch reports the loss instead

_lock = threading.Lock()
_current: "RayCluster | None" = None


class RayCluster:
    """This process's Ray connection: joined or started in the `coolfusion-ray` thread,
    then watched from it (the module docstring says why). One per process, like Ray's own."""

    def __init__(self, rc: RayConfig):
        self.address = rc.address
        self.lost: str | None = None  # why the cluster is unavailable; None while it answers
        self._init_kwargs: dict[str, Any] = {"address": rc.address}
        if rc.runtime_env is not None:
            self._init_kwargs["runtime_env"] = dict(rc.runtime_env)
        self._joined = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="coolfusion-ray", daemon=True)

    def start(self) -> "RayCluster":
        """Join or start the cluster (in the `coolfusion-ray` thread); raises what ray.init raised."""
        self._thread.start()
        self._joined.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def watching(self) -> bool:
        return self._thread.is_alive()

    def get(self, ref: Any) -> Any:
        """`ray.get(ref)`, that gives up with NotReady once the cluster is lost (a call in
        flight on a dead cluster could otherwise wait for ever)."""
        while True:
            if self.lost:
                raise NotReady(self.lost)
            try:
                return ray.get(ref, timeout=WATCH_S)
            except GetTimeoutError:
                continue

    # ---- the coolfusion-ray thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._join()
        except BaseException as err:  # noqa: BLE001  (handed to start())
            self._error = err
            return
        finally:
            self._joined.set()
        if ray.util.client.ray.is_connected():
            return  # Ray Client (ray://): no GCS client here; its calls fail when the cluster is gone
        self._watch()

    def _join(self) -> None:
        if ray.is_initialized():
            log.info("using this process's Ray connection (ray.address is not used)")
            return
        os.environ.setdefault(GCS_EXIT_ENV, str(NO_GCS_EXIT_S))
        try:
            ray.init(**self._init_kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"ray.address: cannot connect to a Ray cluster at {self.address!r}: {err}") from None

    def _watch(self) -> None:
        while True:  # for as long as the process runs (see the module docstring)
            time.sleep(WATCH_S)
            if not ray.is_initialized():
                return  # ray.shutdown() was called (tests): the next connect() starts afresh
            why = self._why_lost()
            if why is not None and self.lost is None:
                log.error("the Ray cluster is lost: %s. Requests get 503 engine_not_ready until the "
                          "cluster answers again or the server is restarted", why)
            elif why is None and self.lost is not None:
                log.warning("the Ray cluster answers again")
            self.lost = None if why is None else f"the Ray cluster is lost: {why}"

    def _why_lost(self) -> str | None:
        node = ray._private.worker._global_node  # the head this process started, if any
        for name in HEAD_PROCESSES:
            for info in (node.all_processes.get(name, []) if node is not None else []):
                code = info.process.poll()
                if code is not None:
                    return f"Ray's {name} (pid {info.process.pid}), started by this server, {_ended(code)}"
        try:
            ray._private.worker.global_worker.gcs_client.internal_kv_get(
                b"coolfusion-probe", None, timeout=PROBE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001  (any failure to answer is the finding)
            if not ray.is_initialized():
                return None
            return f"its GCS does not answer ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        return None


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def connect(rc: RayConfig) -> RayCluster:
    """This process's Ray connection: the one made before if it is still watched, else a new
    one (joining or starting the cluster named by `ray.address`)."""
    global _current
    with _lock:
        if _current is None or not _current.watching:
            _current = RayCluster(rc).start()
        return _current

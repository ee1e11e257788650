"""Load test: N concurrent clients on loopback against a Cool-Fusion server (issue 7).

    python -m coolfusion.bench.load_test                       # load config.yaml, serve in-process, 32 clients
    python -m coolfusion.bench.load_test --clients 8 --max-tokens 8
    python -m coolfusion.bench.load_test --base-url http://127.0.0.1:8000 --server-pid 1234

What it does, in order (every loop is bounded; it stops by itself):

1. References: every distinct request of the plan (endpoint x prompt) is run alone, one
   after another, greedy and non-streamed. This also warms the models up.
2. RSS baseline of the server process (gc first): in-process, this process; with
   `--base-url`, the process given by `--server-pid` (else RSS is not measured).
3. Load: all clients start together (a barrier). Mixed: completions / chat x stream /
   non-stream, each (endpoint, prompt) in both modes; a quarter of the clients (stream ones)
   hang up right after their first content chunk. A sampler thread records peak RSS.
4. After: wait until the server reports no running generation, gc, RSS again; then run the
   first reference request once more (the server still answers the same after the load).

Properties (`Report.failures()` lists the violated ones; the exit status is 1 if any):
- every finished response (text bytes, finish_reason, completion_tokens) is identical to
  the same request run alone; for a stream, also no in-band error and a final [DONE];
- no 5xx, no transport error;
- RSS after the load within `--rss-tolerance` (10%) of the baseline.

Admission: the in-process server is built with max_queue >= clients, so every client is
admitted or queued (429 is not expected). A 429 is still counted and retried after its
Retry-After (at most `--max-retries` times), so the script also works against a server with
a small queue; a request that exhausts its retries counts as failed.

Importable: `plan_clients`, `run_load(base_url, plan, ...) -> Report`, and
`serve_and_load(engine, ...)` (an in-process server around an engine; tests use it).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from coolfusion.bench.load_clients import (
    PROMPTS, ClientSpec, Outcome, PeakSampler, plan_clients, rss_bytes, scrape, send, wait_idle,
)
from coolfusion.config import ServerConfig
from coolfusion.extras import require

httpx = require("httpx", "bench")
SERVER = ServerConfig()  # the server's defaults: an in-process server starts from them

# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Reference:
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    seconds: float


@dataclass
class Report:
    clients: int
    max_tokens: int
    references: dict[tuple[str, str], Reference]
    outcomes: list[Outcome]
    wall_s: float
    segments: float
    completion_tokens: float
    rss_baseline: int | None
    rss_peak: int | None
    rss_after: int | None
    rss_tolerance: float
    idle_after: bool
    cancelled: float = 0.0  # generations the server stopped early during the load (hang-ups)
    post_check: Outcome | None = None
    mismatches: list[str] = field(default_factory=list)

    # figures
    @property
    def requests(self) -> int:
        return len(self.outcomes) + sum(o.retries_429 for o in self.outcomes)

    @property
    def ok(self) -> int:
        return sum(o.finished for o in self.outcomes)

    @property
    def n429(self) -> int:
        return sum(o.retries_429 for o in self.outcomes) + sum(o.status == 429 for o in self.outcomes)

    @property
    def disconnects(self) -> int:
        return sum(o.disconnected for o in self.outcomes)

    @property
    def server_errors(self) -> list[Outcome]:
        """5xx statuses, in-band errors, transport errors (a 499 is never sent: the client is gone)."""
        return [o for o in self.outcomes if (o.status or 0) >= 500 or o.in_band_error is not None or o.error is not None]

    def latency(self, q: float) -> float | None:
        xs = sorted(o.seconds for o in self.outcomes if o.finished)
        if not xs:
            return None
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]  # nearest rank

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_baseline or self.rss_after is None:
            return None
        return (self.rss_after - self.rss_baseline) / self.rss_baseline

    def failures(self, *, check_rss: bool = True) -> list[str]:
        out = list(self.mismatches)
        for o in self.server_errors:
            out.append(f"client {o.spec.index if o.spec else '?'} ({o.spec.kind if o.spec else '?'}): "
                       f"status {o.status}, in-band {o.in_band_error}, error {o.error}")
        for o in self.outcomes:
            if not o.finished and not o.disconnected and o not in self.server_errors:
                out.append(f"client {o.spec.index if o.spec else '?'}: did not finish (status {o.status})")
        if not self.idle_after:
            out.append("the server still had running generations after the load")
        if self.post_check is not None and self.post_check.error:
            out.append(f"post-load check failed: {self.post_check.error}")
        growth = self.rss_growth
        if check_rss and growth is not None and abs(growth) > self.rss_tolerance:
            out.append(f"RSS after the load is {growth:+.1%} from its baseline (tolerance {self.rss_tolerance:.0%})")
        return out

    def lines(self) -> list[str]:
        def mb(x: int | None) -> str:
            return "n/a" if x is None else f"{x / 2**20:.1f} MiB"

        def sec(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2f} s"

        growth = self.rss_growth
        ref_s = sum(r.seconds for r in self.references.values())
        return [
            f"clients: {self.clients}  max_tokens: {self.max_tokens}  references: {len(self.references)} "
            f"(run alone in {ref_s:.1f} s)",
            f"requests: {self.requests}  ok: {self.ok}  429s: {self.n429}  disconnects: {self.disconnects} "
            f"(generations cancelled: {self.cancelled:.0f})  "
            f"5xx/errors: {len(self.server_errors)}  mismatches: {len(self.mismatches)}",
            f"latency p50: {sec(self.latency(0.50))}  p95: {sec(self.latency(0.95))}  wall: {self.wall_s:.1f} s",
            f"segments: {self.segments:.0f} ({self.segments / self.wall_s if self.wall_s else 0:.2f}/s)  "
            f"completion tokens: {self.completion_tokens:.0f} "
            f"({self.completion_tokens / self.wall_s if self.wall_s else 0:.2f}/s)",
            f"RSS baseline: {mb(self.rss_baseline)}  peak: {mb(self.rss_peak)}  after: {mb(self.rss_after)}  "
            f"({'n/a' if growth is None else f'{growth:+.1%}'})",
        ]


def _same(o: Outcome, ref: Reference) -> str | None:
    """Why a finished response differs from its reference (None: identical)."""
    if o.text.encode("utf-8") != ref.text.encode("utf-8"):
        return f"text {o.text!r} != reference {ref.text!r}"
    if o.finish_reason != ref.finish_reason:
        return f"finish_reason {o.finish_reason!r} != reference {ref.finish_reason!r}"
    if o.completion_tokens != ref.completion_tokens:
        return f"completion_tokens {o.completion_tokens} != reference {ref.completion_tokens}"
    if o.spec is not None and o.spec.stream and not o.done:
        return "the stream did not end with [DONE]"
    return None


def check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname or ""
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve {host!r}: {err}") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"refusing a non-loopback target {base_url!r} (resolves to {sorted(addrs)})")


def run_load(
    base_url: str,
    plan: list[ClientSpec],
    *,
    max_tokens: int = 16,
    model: str = "cool-fusion",
    api_key: str | None = None,
    server_pid: int | None = -1,
    engine: Any | None = None,
    rss_tolerance: float = 0.10,
    request_timeout_s: float = SERVER.request_timeout_s,
    max_retries: int = 5,
    idle_timeout_s: float = 120.0,
    log: Callable[[str], None] = lambda s: None,
) -> Report:
    """Run the plan against a server; `server_pid`: whose RSS to measure (-1: this process,
    None: do not measure). `engine`, if in-process, is also asked for `active_requests`."""
    check_loopback(base_url)
    pid = os.getpid() if server_pid == -1 else server_pid
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)

    def client() -> httpx.Client:
        return httpx.Client(base_url=base_url, headers=headers, timeout=timeout, trust_env=False)

    with client() as http:
        # 1. references, alone and in order (also the warm-up)
        refs: dict[tuple[str, str], Reference] = {}
        for spec in plan:
            if spec.key in refs:
                continue
            o = send(http, spec.endpoint, spec.prompt, stream=False, max_tokens=max_tokens, model=model,
                     max_retries=max_retries)
            if not o.finished:
                raise RuntimeError(f"reference request {spec.key} failed: status {o.status}, {o.error}")
            refs[spec.key] = Reference(o.text, o.finish_reason, o.completion_tokens, o.seconds)
            log(f"reference {spec.endpoint:<11} {spec.prompt[:40]!r}: {o.text!r} ({o.seconds:.1f} s)")

        # 2. baseline
        wait_idle(http, engine, idle_timeout_s)
        gc.collect()
        baseline = rss_bytes(pid) if pid is not None else None
        before = scrape(http)

        # 3. the load
        barrier = threading.Barrier(len(plan))

        def one(spec: ClientSpec) -> Outcome:
            with client() as h:
                try:
                    barrier.wait(timeout=30)
                except threading.BrokenBarrierError:
                    pass
                return send(h, spec.endpoint, spec.prompt, stream=spec.stream, max_tokens=max_tokens, model=model,
                            disconnect=spec.disconnect, max_retries=max_retries, spec=spec)

        log(f"load: {len(plan)} clients ...")
        t0 = time.perf_counter()
        with PeakSampler(pid) as sampler, ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="load-client") as pool:
            outcomes = list(pool.map(one, plan))
            wall = time.perf_counter() - t0
            # 4. after: the server settles (hung-up generations stop at their next segment)
            idle = wait_idle(http, engine, idle_timeout_s)
        after_metrics = scrape(http)
        gc.collect()
        time.sleep(0.2)
        gc.collect()
        rss_after = rss_bytes(pid) if pid is not None else None
        peak = sampler.peak if pid is not None else None

        first = plan[0]
        post = send(http, first.endpoint, first.prompt, stream=False, max_tokens=max_tokens, model=model,
                    max_retries=max_retries, spec=first)

    mismatches = []
    for o in outcomes:
        if o.finished and o.spec is not None:
            why = _same(o, refs[o.spec.key])
            if why:
                mismatches.append(f"client {o.spec.index} ({o.spec.kind}): {why}")
    if post.finished:
        why = _same(post, refs[first.key])
        if why:
            mismatches.append(f"after the load, {first.kind}: {why}")
    return Report(
        clients=len(plan), max_tokens=max_tokens, references=refs, outcomes=outcomes, wall_s=wall,
        segments=after_metrics["coolfusion_segments_total"] - before["coolfusion_segments_total"],
        completion_tokens=after_metrics["coolfusion_completion_tokens_total"] - before["coolfusion_completion_tokens_total"],
        rss_baseline=baseline, rss_peak=peak, rss_after=rss_after, rss_tolerance=rss_tolerance,
        idle_after=idle, post_check=post,
        cancelled=after_metrics["coolfusion_generations_cancelled_total"] - before["coolfusion_generations_cancelled_total"], mismatches=mismatches,
    )


def serve_and_load(engine: Any, plan: list[ClientSpec], *, max_concurrent: int | None = None,
                   max_queue: int | None = None, request_timeout_s: float = SERVER.request_timeout_s,
                   api_key: str | None = None, **kw: Any) -> Report:
    """An in-process server around `engine` (max_concurrent: the config schema's default
    unless given; max_queue >= clients unless given), loaded by `plan`."""
    from coolfusion.server.app import create_app
    from coolfusion.server.testing import serve_in_thread

    settings = ServerConfig(max_concurrent=max_concurrent or SERVER.max_concurrent,
                            max_queue=len(plan) if max_queue is None else max_queue,
                            request_timeout_s=request_timeout_s, api_key=api_key)
    with serve_in_thread(create_app(engine, settings)) as base_url:
        return run_load(base_url, plan, api_key=api_key, server_pid=-1, engine=engine,
                        request_timeout_s=request_timeout_s, **kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="target a running server on loopback instead of starting one in-process")
    p.add_argument("--server-pid", type=int, help="with --base-url: the server's pid, to measure its RSS")
    p.add_argument("--config", default="config.yaml", help="in-process: the config (default: %(default)s)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"distinct prompts, 1-{len(PROMPTS)} (default: %(default)s)")
    p.add_argument("--disconnect-fraction", type=float, default=0.25, help="clients that hang up mid-stream (default: %(default)s)")
    p.add_argument("--model", default="cool-fusion", help="model id (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("COOLFUSION_API_KEY"), help="Bearer key (default: env COOLFUSION_API_KEY)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="in-process server: generation slots (default: the config's server.max_concurrent)")
    p.add_argument("--batching", choices=["config", "on", "off"], default="config",
                   help="in-process server: fusion.batching as in the config, or forced on/off (default: %(default)s)")
    p.add_argument("--max-queue", type=int, help="in-process server: queue places (default: the number of clients)")
    p.add_argument("--request-timeout", type=float, default=SERVER.request_timeout_s, help="server and client time limit per request (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=5, help="retries of a 429, after its Retry-After (default: %(default)s)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS change after the load (default: %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    plan = plan_clients(args.clients, PROMPTS[: args.prompts], args.disconnect_fraction)
    common = dict(max_tokens=args.max_tokens, model=args.model, rss_tolerance=args.rss_tolerance,
                  max_retries=args.max_retries, log=lambda s: print(s, flush=True))
    if args.base_url:
        report = run_load(args.base_url, plan, api_key=args.api_key, server_pid=args.server_pid,
                          request_timeout_s=args.request_timeout, **common)
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from coolfusion.config import load_config
        from coolfusion.engine.engine import Engine

        cfg = load_config(args.config)
        if args.batching != "config":
            cfg = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"batching": args.batching == "on"})})
        t = time.perf_counter()
        engine = Engine.from_config(cfg)
        print(f"engine loaded in {time.perf_counter() - t:.1f} s", flush=True)
        report = serve_and_load(engine, plan, max_concurrent=args.max_concurrent or cfg.server.max_concurrent,
                                max_queue=args.max_queue,
                                request_timeout_s=args.request_timeout, api_key=args.api_key, **common)
    for line in report.lines():
        print(line)
    bad = report.failures()
    for line in bad:
        print("FAIL:", line)
    print("PASS" if not bad else f"FAIL ({len(bad)} problems)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

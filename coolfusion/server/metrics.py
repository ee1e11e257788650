"""Prometheus metrics of one app, in its own CollectorRegistry (never the global one).

Label values are bounded: routes are route templates (or "unmatched"), models are the
engine's model ids (unknown ids are rejected before anything is counted), winners are
source model names. Counters may be updated from engine worker threads (prometheus-client
is thread-safe).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coolfusion.core.types import Step

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "coolfusion_"
        self.requests = Counter(p + "requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            p + "request_duration_seconds", "HTTP request duration (streams: until the last byte)", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting for a generation slot", registry=r)
        self.slots_in_use = Gauge(p + "slots_in_use", "generation slots held (running requests)", registry=r)
        self.active_generations = Gauge(p + "active_generations", "engine generations running now", registry=r)
        self.rejected = Counter(p + "rejected", "requests refused by admission control", ["reason"], registry=r)
        self.cancelled = Counter(p + "generations_cancelled", "generations stopped early", ["reason"], registry=r)
        self.stream_errors = Counter(p + "stream_errors", "errors sent in-band after a stream began", ["code"], registry=r)
        self.generations = Counter(p + "generations", "engine generations finished", ["model", "outcome"], registry=r)
        self.segments = Counter(p + "segments", "selected segments (steps) produced", ["model"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens (reference tokenizer)", ["model"], registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "completion tokens (reference tokenizer)", ["model"], registry=r)
        self.wins = Counter(p + "segment_wins", "segments won, by source model", ["model", "winner"], registry=r)
        # speculative proposals (docs/speculative.md), by source model
        self.drafts = Counter(p + "speculative_drafts", "steps a source model drafted", ["model"], registry=r)
        self.draft_tokens = Counter(p + "speculative_checked_tokens", "draft tokens a source model checked "
                                    "(its own tokens of another model's draft)", ["model"], registry=r)
        self.accepted_tokens = Counter(p + "speculative_accepted_tokens", "checked draft tokens a source model "
                                       "accepted (its greedy decoding agreed)", ["model"], registry=r)
        self.step_seconds = Histogram(
            p + "step_latency_seconds", "time the engine took to produce one segment", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.engine_ready = Gauge(p + "engine_ready", "1 when the engine is loaded and healthy", registry=r)
        self.kv_slots = Gauge(p + "kv_slots", "KV slots of a source model (fusion.batching)", ["model"], registry=r)
        self.kv_slots_in_use = Gauge(p + "kv_slots_in_use", "KV slots held by running requests", ["model"], registry=r)
        self.kv_bytes = Gauge(p + "kv_bytes", "bytes preallocated for a model's KV slots", ["model"], registry=r)

    def on_admission(self, running: int, waiting: int) -> None:
        self.slots_in_use.set(running)
        self.queue_depth.set(waiting)

    def on_step(self, model: str, step: Step, seconds: float) -> None:
        self.segments.labels(model).inc()
        self.wins.labels(model, step.winner).inc()
        self.step_seconds.labels(model).observe(seconds)
        if step.speculation is not None:
            self.drafts.labels(step.speculation["drafter"]).inc()
            for source, n in step.speculation["checked"].items():
                self.draft_tokens.labels(source).inc(n)
            for source, n in step.speculation["accepted"].items():
                self.accepted_tokens.labels(source).inc(n)

    def on_kv(self, report: dict[str, dict[str, int]]) -> None:
        """The engine's KV storage per model (`Engine.kv_report()`), read at each scrape."""
        for model, kv in report.items():
            self.kv_slots.labels(model).set(kv["slots"])
            self.kv_slots_in_use.labels(model).set(kv["slots_in_use"])
            self.kv_bytes.labels(model).set(kv["bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Speculative proposals, the loop's side: who drafts, and the propose phase with a draft
(docs/speculative.md).

For a greedy request of a fused id (config `fusion.speculative`, request `fusion.speculative`),
one model drafts each step, i.e. proposes exactly as without speculation, lookahead included,
and every other model checks the draft's text in one forward (`Worker.check_draft`,
coolfusion.runtime.draft_check) and cuts its own proposal from what it accepted. Every
proposal, hence every selected segment, is the one the plain propose phase gives.

Who drafts (config `fusion.drafter`): `winner` (the default), the last step's winner (the
fastest on the first step); `fastest`, the model whose forward was measured cheapest; or a
model's name. Under load (`fusion.speculative_max_requests`) a step proposes plainly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from coolfusion.workers.protocol import Proposal

DRAFTER_RULES = ("fastest", "winner")


@dataclass
class Drafting:
    """One request's drafter choice. `fastest_first()`: the source model names, cheapest
    forward first (measured once per engine, when a step first needs it). A step speculates
    only while `load()` (requests generating on the engine) is at most `max_requests` (config
    `fusion.speculative_max_requests`): under load, plain proposals share each batched forward
    better (docs/speculative.md)."""

    rule: str  # "fastest" | "winner" | a model name
    fastest_first: Callable[[], Sequence[str]]
    last_winner: str | None = None
    load: Callable[[], int] = lambda: 1
    max_requests: int | None = None  # None: whatever the load

    def on(self) -> bool:
        """Whether this step drafts and checks (else every model proposes as without speculation)."""
        return self.max_requests is None or self.load() <= self.max_requests

    def drafter(self, names: Sequence[str]) -> int:
        """Index in `names` (the run's models, config order) of this step's drafter."""
        if self.rule == "winner" and self.last_winner in names:
            return list(names).index(self.last_winner)
        if self.rule in names:
            return list(names).index(self.rule)
        order = self.fastest_first()
        return min(range(len(names)), key=lambda i: _rank(order, names[i]))


def _rank(order: Sequence[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def draft_text(p: Proposal) -> str:
    """What a drafter offers the others: its candidate, then its lookahead (none after an end)."""
    return p.text if p.eos else p.text + p.lookahead


def propose_with_draft(run, drafting: Drafting) -> tuple[list[Proposal], dict]:
    """The propose phase of `coolfusion.core.loop` with a draft: the drafter proposes, then the
    others check its text in parallel. Returns every proposal (config order) and the step's
    speculation record for the trace: drafter, and per model tokens checked and accepted."""
    names = [w.name for w in run.workers]
    d = drafting.drafter(names)
    t = time.perf_counter()
    draft = run.workers[d].propose(run.states[d], run.align, run.max_segment_tokens)
    text = draft_text(draft)
    checks = run.each(lambda w, s: w.check_draft(s, text, run.align, run.max_segment_tokens), skip=d)
    run.stats.add("propose", time.perf_counter() - t)
    proposals = checks[:d] + [draft] + checks[d:]
    record = {"drafter": names[d],
              "checked": {n: p.checked for i, (n, p) in enumerate(zip(names, proposals)) if i != d},
              "accepted": {n: p.accepted for i, (n, p) in enumerate(zip(names, proposals)) if i != d}}
    return proposals, record

"""The fusion loop over workers: propose, assess, select, commit (docs/architecture.md).

`segments(run)` yields one `RawStep` per selected segment for Cool (common boundaries),
Cool-align (each proposer stops at its own word boundary) and a single model (k=1), until a
winner ends the turn (`end="eos"`) or the next step could overflow a model's context
(`end="context_full"`). `rerank(...)` scores whole continuations. Nothing here knows about
stop strings or max_tokens: `coolfusion.core.output` applies those to the text this yields.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from coolfusion.core.errors import Cancelled
from coolfusion.core.selection import Selection
from coolfusion.core.speculation import Drafting, propose_with_draft
from coolfusion.core.types import Candidate, Stats
from coolfusion.workers.protocol import Proposal, Worker


@dataclass
class RawStep:
    text: str
    winner: str
    eos: bool
    candidates: tuple[Candidate, ...]
    end: Literal["eos", "context_full"] | None = None  # why the loop stops after this step
    end_id: int | None = None  # with eos: the end token its first proposer decoded
    speculation: dict | None = None  # with a draft: drafter, tokens checked / accepted per model


def map_on(pool: ThreadPoolExecutor | None, fn, items: Sequence) -> list:
    """[fn(item) for item in items], on `pool`'s threads when there is a pool and more than one
    item (a worker call blocks on its model, so the models run side by side)."""
    if pool is None or len(items) == 1:
        return [fn(x) for x in items]
    return [f.result() for f in [pool.submit(fn, x) for x in items]]


@dataclass
class Run:
    """One request's states on its participating workers (in config order)."""

    workers: Sequence[Worker]
    states: list[Any]
    end_ids: list[int]  # per worker: the token that ends its turn, scored after an EOS candidate
    pool: ThreadPoolExecutor | None
    cancel: threading.Event | None
    max_segment_tokens: int
    stats: Stats
    score_mode: str = "mean_nll"
    selection: Selection = Selection()  # how the models' perplexities choose the winner
    align: bool = True  # False: Cool-align ablation, proposals end at their own word boundary
    fast: bool = True  # False: score even when every proposal agrees (the reference path)
    drafting: Drafting | None = None  # speculative proposals (coolfusion.core.speculation); None: off

    def each(self, fn, skip: int | None = None):
        """fn(worker, state) for every worker (but the `skip`th), in parallel when a pool is
        configured."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("generation cancelled")
        pairs = [ws for i, ws in enumerate(zip(self.workers, self.states)) if i != skip]
        return map_on(self.pool, lambda pair: fn(*pair), pairs)

    def context_full(self) -> bool:
        """True when one more proposal could overflow a participating model's context."""
        for w, s in zip(self.workers, self.states):
            if w.context_limit and w.seq_len(s) + self.max_segment_tokens >= w.context_limit:
                return True
        return False

    def close(self) -> None:
        for w, s in zip(self.workers, self.states):
            w.close(s)


def _timed(run: Run, phase: str, fn):
    t = time.perf_counter()
    out = run.each(fn)
    run.stats.add(phase, time.perf_counter() - t)
    return out


def propose(run: Run) -> list[Proposal]:
    return _timed(run, "propose", lambda w, s: w.propose(s, run.align, run.max_segment_tokens))


def propose_step(run: Run) -> tuple[list[Proposal], dict | None]:
    """Every model's proposal: each decoding its own, or, with speculation, one drafting and
    the others checking its draft (the same proposals); and the speculation record."""
    if run.drafting is None or len(run.workers) < 2 or not run.drafting.on():
        return propose(run), None
    return propose_with_draft(run, run.drafting)


def assess(run: Run, proposals: list[Proposal]) -> list[Candidate]:
    """Deduplicate; if more than one distinct candidate remains, every model scores every one."""
    keys: dict[tuple[str, bool], list[str]] = {}
    for w, p in zip(run.workers, proposals):
        keys.setdefault((p.text, p.eos), []).append(w.name)
    if len(keys) == 1 and run.fast:
        (text, eos), by = next(iter(keys.items()))
        return [Candidate(text, tuple(by), eos)]
    return _scored(run, keys)


def _scored(run: Run, keys: dict[tuple[str, bool], list[str]]) -> list[Candidate]:
    """Every model scores every (text, eos) candidate in one batched pass (an ending as the
    selection's end rule says); each candidate's score combines the models that voted."""
    cands = list(keys)
    sel = run.selection
    ends = {w.name: e for w, e in zip(run.workers, run.end_ids)}

    def score(w, s) -> list[float | None]:
        asks = [_asked(sel, w.name, text, eos) for text, eos in cands]  # what w scores per candidate
        distinct = list(dict.fromkeys(a for a in asks if a is not None))
        ppl = dict(zip(distinct, w.score(s, distinct, end_id=ends[w.name], mode=run.score_mode))) if distinct else {}
        return [None if a is None else ppl[a] for a in asks]

    ppls = _timed(run, "score", score)
    out = []
    for j, (text, eos) in enumerate(cands):
        ppl = {w.name: ppls[i][j] for i, w in enumerate(run.workers) if ppls[i][j] is not None}
        mean = sum(ppl.values()) / len(ppl) if ppl else None
        out.append(Candidate(text, tuple(keys[(text, eos)]), eos, ppl, mean, sel.combine(ppl)))
    return out


def _asked(sel: Selection, model: str, text: str, eos: bool) -> tuple[str, bool] | None:
    """The (text, with-end-token) pair `model` scores for a candidate; None: it does not vote."""
    if not eos:
        return (text, False)
    with_end = sel.scores_end(model, text)
    return None if with_end is None else (text, with_end)


def select(cands: list[Candidate]) -> Candidate:
    """argmin of the selection rule's score (Eq. 3 by default); ties go to the earlier proposer
    (candidates are in config order of their first proposer)."""
    if len(cands) == 1:
        return cands[0]
    return min(cands, key=lambda c: c.score)  # min keeps the first of equal keys


def commit(run: Run, winner: Candidate) -> None:
    _timed(run, "commit", lambda w, s: w.commit(s, winner.text, winner.eos))


def step(run: Run) -> RawStep:
    """One fused step from the states as they are: propose (with a draft when speculating),
    assess, select; nothing committed (`end` is "eos" when the winner ends the turn). The
    fused top alternative of a prefix (coolfusion.engine.alternatives) is this step's first
    token."""
    proposals, speculation = propose_step(run)
    cands = assess(run, proposals)
    win = select(cands)
    run.stats.steps += 1
    run.stats.agreed += len(cands) == 1
    end_id = proposals[[w.name for w in run.workers].index(win.proposed_by[0])].end_id if win.eos else None
    if run.drafting is not None:
        run.drafting.last_winner = win.proposed_by[0]
    return RawStep(win.text, win.proposed_by[0], win.eos, tuple(cands), "eos" if win.eos else None, end_id,
                   speculation)


def segments(run: Run):
    """Yield RawSteps until one carries an `end` (the engine may stop earlier on budget/stop)."""
    while True:
        raw = step(run)
        if not raw.eos:
            commit(run, Candidate(raw.text, (raw.winner,), False))
            raw.end = "context_full" if run.context_full() else None
        yield raw
        if raw.end is not None:
            return


def rerank(run: Run, continuations: list[tuple[str, bool, tuple[str, ...]]]) -> RawStep:
    """Every model scores every whole continuation from the prompt; the lowest score wins.
    `continuations` are (text, eos, proposed_by) in tie-break order."""
    merged: dict[tuple[str, bool], list[str]] = {}
    for text, eos, by in continuations:
        merged.setdefault((text, eos), []).extend(b for b in by if b not in merged.get((text, eos), []))
    cands = _scored(run, merged)
    win = select(cands)
    return RawStep(win.text, win.proposed_by[0], win.eos, tuple(cands), "eos" if win.eos else None)

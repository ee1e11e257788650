"""What the client receives: stop strings and `max_tokens` applied to the selected segments.

`finish(raw, req, ref, prompt_tokens, cancel)` turns the loop's `RawStep`s into `Step`s: it
ends the output before the first stop string, cuts a segment that crosses `max_tokens` at
that token of the reference tokenizer (`ref`), holds back text that could be the start of a
stop string until it is decided, and counts tokens for `usage`.
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator

from coolfusion.core.errors import Cancelled
from coolfusion.core.loop import RawStep
from coolfusion.workers.tokenizer_side import TokenizerSide
from coolfusion.core.types import GenerationRequest, Step


def finish(raw: Iterable[RawStep], req: GenerationRequest, ref: TokenizerSide, prompt_tokens: int,
           cancel: threading.Event | None) -> Iterator[Step]:
    g = ""  # all text selected so far
    emitted = 0  # chars of g already yielded
    longest = max((len(s) for s in req.stop), default=0)
    for step in raw:
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        g += step.text
        finish = None
        end = len(g)
        hit = first_stop(g, req.stop, max(0, emitted - longest))
        if hit is not None:
            end, finish = hit, "stop"
        # max_tokens in the reference tokenizer
        ids, starts = ref.encode_with_starts(g[:end])
        counted = end  # `ids` are the tokens of g[:counted]
        if len(ids) >= req.max_tokens:
            cut = starts[req.max_tokens] if len(ids) > req.max_tokens else end
            if cut <= end:
                end, finish = cut, "length" if finish is None or cut < end else finish
        if finish is None and step.end is not None:
            finish = "stop" if step.eos else "length"
        if finish is None and longest:
            end -= held(g[:end], req.stop)
        text = g[emitted:end]
        emitted = max(emitted, end)
        n = len(ids) if emitted == counted else len(ref.encode(g[:emitted]))  # encode once per step
        eos = step.eos and finish == "stop"
        yield Step(text, step.winner, eos, step.candidates if req.trace else (),
                   finish, min(n, req.max_tokens), prompt_tokens, end_id=step.end_id if eos else None,
                   speculation=step.speculation)
        if finish is not None:
            return


def first_stop(text: str, stops, start: int = 0) -> int | None:
    """Offset of the earliest stop string in `text` found at or after `start`."""
    hit = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (hit is None or i < hit):
            hit = i
    return hit


def held(text: str, stops) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

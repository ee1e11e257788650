"""Greedy outputs on the real pair, pinned before the engine was reorganised (issue 13).

tests/data/pinned_outputs.json holds, for each request of `pinned_requests.REQUESTS`, the
text, the winner of every segment, the number of candidates per segment, the finish reason
and the token count that the engine gave at the commit named in the file. A change meant to
keep behaviour (a refactor, a speed-up) must reproduce them byte for byte. They were recorded
when endings were always scored with each model's end token, so the requests say
`end_scoring: end_token` (the default is now `text`, issue 17).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pinned_requests import REQUESTS

from coolfusion.core.selection import SelectionRequest
from coolfusion.core.types import GenerationRequest, Message

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_outputs.json").read_text())["outputs"]


def _request(spec: dict, **extra) -> GenerationRequest:
    kw = dict(spec, **extra)
    if "messages" in kw:
        kw["messages"] = tuple(Message(**m) for m in kw["messages"])
    if "stop" in kw:
        kw["stop"] = tuple(kw["stop"])
    return GenerationRequest(trace=True, selection=SelectionRequest(end_scoring="end_token"), **kw)


def test_the_pinned_file_covers_every_pinned_request():
    assert [p["request"] for p in PINNED] == REQUESTS


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("i", range(len(REQUESTS)), ids=[f"{r['model']}-{i}" for i, r in enumerate(REQUESTS)])
def test_greedy_output_is_byte_identical_to_the_pinned_one(engine, i, speculative):
    """Also with speculative proposals (docs/speculative.md), which must not change a byte."""
    pinned = PINNED[i]
    steps = list(engine.generate(_request(REQUESTS[i], speculative=speculative)))
    assert "".join(s.text for s in steps).encode() == pinned["text"].encode()
    assert [s.winner for s in steps] == pinned["winners"]
    assert [len(s.candidates) for s in steps] == pinned["candidates_per_step"]
    assert steps[-1].finish_reason == pinned["finish_reason"]
    assert steps[-1].completion_tokens == pinned["completion_tokens"]

"""Speculative proposals' mechanics on tiny random models (docs/speculative.md).

A check of a draft must leave a model with exactly the proposal (and the cache state) that its
own greedy decoding gives: here drafts are forced to disagree at every position, to end
mid-word, to end the turn, and to sit on a near-tie that the margin guard must refuse.
The real pair's property tests are in test_speculative.py.
"""

from __future__ import annotations

import pytest
import torch

from coolfusion.config import FusionConfig
from coolfusion.engine.engine import Engine
from coolfusion.runtime.loading import LoadedModel
from coolfusion.runtime import draft_check
from test_tiny_random import DEVICE, tiny

PROMPT = "The quick brown fox jumps over the lazy dog and then"
MAX = 6


@pytest.fixture(scope="module")
def tiny_llama(tokenizers):
    smol, gemma = tokenizers
    models = [LoadedModel("tiny-llama", tiny("llama", smol, 0), smol, DEVICE),
              LoadedModel("tiny-gemma3", tiny("gemma3_text", gemma, 1), gemma, DEVICE)]
    return Engine.from_models(models, FusionConfig(max_segment_tokens=MAX)).workers[0]


def _greedy(w, n: int) -> list[int]:
    """The model's own next `n` greedy tokens after the prompt, one decode at a time."""
    ids = w.text.encode(PROMPT, special=True)
    out = []
    for _ in range(n):
        tok = int(w.runner.fresh_logits(ids + out).argmax())
        out.append(tok)
    return out


def _plain_and_checked(w, draft_ids: list[int] | None = None, draft: str = "x"):
    """(plain proposal, proposal after checking a draft, the checking state) from one prompt.
    `draft_ids` forces the model's tokens of the draft (the text side is tested elsewhere)."""
    prompt = w.text.encode(PROMPT, special=True)
    a = w.open(prompt)
    plain = w.propose(a, True, MAX)
    w.close(a)
    b = w.open(prompt)
    if draft_ids is not None:
        w._draft_ids = lambda st, text: list(draft_ids)
    try:
        checked = w.check_draft(b, draft, True, MAX)
    finally:
        w.__dict__.pop("_draft_ids", None)
    return plain, checked, b


def _same(p, q):
    assert (p.text, p.eos, p.n_tokens, p.capped) == (q.text, q.eos, q.n_tokens, q.capped)
    assert p.logprobs == pytest.approx(q.logprobs, abs=1e-4)


@pytest.mark.parametrize("pos", range(MAX + 2))
def test_a_disagreement_at_any_position_of_the_draft_gives_the_plain_proposal(tiny_llama, pos):
    w = tiny_llama
    own = _greedy(w, MAX + 1)
    draft = list(own)
    if pos < len(own):  # else the whole draft is its own
        draft[pos] = (own[pos] + 1) % len(w.text.tokenizer)
    plain, checked, st = _plain_and_checked(w, draft)
    _same(plain, checked)
    assert checked.checked == len(draft)
    reached = plain.n_tokens if plain.n_tokens is not None else len(plain.logprobs)
    assert checked.accepted == pos  # up to the disagreement, exactly its own tokens
    assert reached <= len(st.ids) - len(st.prompt_ids)
    # the cache holds what the proposal reached and no rejected token: its logits equal a fresh prefill
    assert torch.allclose(w.cached_logits(st), w.fresh_logits(st), atol=1e-4)
    w.close(st)


def test_a_draft_ending_mid_word_gives_the_plain_proposal(tiny_llama):
    w = tiny_llama
    own_text = w.text.decode(_greedy(w, MAX))
    for cut in range(1, min(len(own_text), 12)):
        plain, checked, st = _plain_and_checked(w, draft=own_text[:cut])
        _same(plain, checked)
        assert torch.allclose(w.cached_logits(st), w.fresh_logits(st), atol=1e-4)
        w.close(st)


def test_an_end_of_turn_draft_ends_the_turn_exactly_where_greedy_decoding_does(tiny_llama):
    """The model is made to end its turn after its first token (its end token's head row
    copies, a bit larger, the row of the token it writes second): a check of a draft of that
    first token ends the proposal with the end token, read from the check's own last row."""
    w = tiny_llama
    own = _greedy(w, 2)
    head = w.runner.model.get_output_embeddings().weight
    end = w.text.primary_end
    saved = head[end].clone()
    with torch.no_grad():
        head[end] = head[own[1]] * 1.5
    try:
        assert _greedy(w, 2) == [own[0], end]
        plain, checked, st = _plain_and_checked(w, draft=w.text.decode(own[:1]))
        _same(plain, checked)
        assert plain.eos and checked.eos and checked.end_id == plain.end_id == end
        assert checked.accepted == 1
        w.close(st)
    finally:
        with torch.no_grad():
            head[end] = saved


def test_the_margin_guard_stops_accepting_at_a_near_tie_and_decodes_from_there(tiny_llama):
    """A token whose head row equals the row of the model's 2nd greedy token ties with it
    there: the check accepts the first token only, then decodes, and the proposal is the plain
    one. `accept` itself distrusts a row whose lead is under the margin. (The tie is exact, so
    both paths' decodes pick the lower id whatever the float rounding of the forwards before:
    a tie within 1e-7 went either way depending on which tests had run before.)"""
    rows = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0 - 1e-4, 0.0], [0.0, 5.0, 1.0]])
    assert draft_check.accept(rows, [0, 0]) == (1, False)  # row 1: a near-tie, not trusted
    assert draft_check.accept(rows, [0, 1]) == (1, False)
    clear = torch.tensor([[3.0, 1.0, 0.0], [0.0, 5.0, 1.0], [4.0, 0.0, 0.0]])
    assert draft_check.accept(clear, [0, 1]) == (2, True)  # all accepted, the last row trusted
    assert draft_check.accept(clear, [1, 1]) == (0, True)  # first row disagrees: its argmax is next

    w = tiny_llama
    own = _greedy(w, MAX + 1)
    head = w.runner.model.get_output_embeddings().weight
    twin = (own[1] + 1) % head.shape[0]
    saved = head[twin].clone()
    with torch.no_grad():
        head[twin] = head[own[1]]
    try:
        assert _greedy(w, 2)[:1] == own[:1]
        plain, checked, st = _plain_and_checked(w, _greedy(w, MAX + 1))
        _same(plain, checked)
        assert checked.accepted == 1  # stopped at the tie, though the fed token was its argmax
        w.close(st)
    finally:
        with torch.no_grad():
            head[twin] = saved

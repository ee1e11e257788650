"""A worker's KV shortcuts give what the plain path gives, on both runners (tiny random models).

- `fork`: a new state whose KV of the common prefix is copied from another state's;
- `score` folds the committed tokens not cached yet into the blocks' forward (one forward, not
  a sync and then the blocks);
- `score` takes a candidate's log-probs from the tokens the state decoded when the candidate's
  tokens begin them (no forward).

Each is compared with the state that the plain operations give (`open` + `rewind`, a sync
first, a block forward): logits against a full forward without cache, perplexities within
float rounding. Forward counts show the shortcut was taken.
"""

from __future__ import annotations

import math

import pytest
import torch

from coolfusion.config import FusionConfig
from coolfusion.runtime.loading import LoadedModel
from coolfusion.workers.local import local_workers

from test_tiny_random import DEVICE, tiny  # noqa: E402

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time, in a land far away,",
           "def add(a, b):\n    return", "Les élèves ont lu le livre et"]


@pytest.fixture(scope="module", params=["batched", "one-at-a-time"])
def workers(request, tokenizers):
    smol, gemma = tokenizers
    models = [LoadedModel("tiny-llama", tiny("llama", smol, 0), smol, DEVICE),
              LoadedModel("tiny-gemma3", tiny("gemma3_text", gemma, 1), gemma, DEVICE)]
    ws = local_workers(models, FusionConfig(max_segment_tokens=6, batching=request.param == "batched",
                                            kv_slots=8, kv_max_tokens=256))
    yield ws
    for w in ws:
        w.shutdown()


def forwards(w) -> int:
    return w.runner.forwards


def test_a_forked_state_holds_the_copied_prefix_and_feeds_only_the_rest(workers):
    for w in workers:
        ids = w.text.encode(PROMPTS[0], special=True)
        src = w.open(ids)
        prompt = ids[:-3] + [ids[-1], ids[-2]]  # shares all but the last three tokens with src
        fed = w.runner.forward_tokens
        new = w.fork(src, prompt)
        assert w.runner.forward_tokens - fed == len(ids) - 3  # the source fed the common prefix, once
        assert new.kv_len == len(ids) - 3 and new.ids == prompt
        cached, fresh = w.cached_logits(new), w.fresh_logits(new)
        assert torch.allclose(cached, fresh, atol=1e-4), (w.name, (cached - fresh).abs().max())
        assert w.runner.forward_tokens - fed == len(ids) - 3 + 2  # then the fork fed its own two
        fed = w.runner.forward_tokens
        again = w.fork(src, ids[:5], [(7, -1.0)])  # held by the source already: nothing fed
        assert w.runner.forward_tokens == fed and again.ids == ids[:5] + [7] and again.la_logprobs == [-1.0]
        cached, fresh = w.cached_logits(src), w.fresh_logits(src)  # the source goes on as it was
        assert torch.allclose(cached, fresh, atol=1e-4)
        for st in (src, new, again):
            w.close(st)
        if w.runner.kv_report():
            assert w.runner.kv_report()["slots_in_use"] == 0


def test_score_feeds_uncached_committed_tokens_in_the_blocks_forward(workers):
    cands = [(" runs", False), (" sleeps all day", False), ("", True)]
    for w in workers:
        ids = w.text.encode(PROMPTS[1], special=True)
        folded, synced = w.open(ids), w.open(ids)
        w.cached_logits(synced)  # a sync: the whole prompt in the cache first
        n = forwards(w)
        a = w.score(folded, cands)
        assert forwards(w) - n == 1  # the prompt and the blocks in one forward
        b = w.score(synced, cands)
        for x, y in zip(a, b):
            assert math.isclose(x, y, rel_tol=1e-4), (w.name, a, b)
        assert folded.kv_len == len(ids)
        w.commit(folded, cands[1][0])  # the scored block moves into place after the folded prompt
        cached, fresh = w.cached_logits(folded), w.fresh_logits(folded)
        assert torch.allclose(cached, fresh, atol=1e-4), (w.name, (cached - fresh).abs().max())
        w.close(folded)
        w.close(synced)


def test_a_candidate_that_begins_the_decoded_tokens_is_scored_from_their_log_probs(workers):
    checked = 0
    for w in workers:
        for prompt in PROMPTS:
            ids = w.text.encode(prompt, special=True)
            st = w.open(ids)
            w.propose(st, True, 6)
            decoded = st.ids[len(ids):]
            for k in range(1, len(decoded) + 1):
                text = w.text.decode(decoded[:k])
                if "\ufffd" in text or w.text.encode(text) != decoded[:k]:
                    continue  # not this text's own tokens: it would be scored as a block
                n = forwards(w)
                got = w.score(st, [(text, False)], mode="nll_sum")[0]
                assert forwards(w) == n  # read off the decoded tokens
                ref = w.open(ids)
                want = w.score(ref, [(text, False)], mode="nll_sum")[0]
                assert math.isclose(got, want, rel_tol=1e-4), (w.name, prompt, text, got, want)
                w.close(ref)
                checked += 1
            w.close(st)
    assert checked >= 4


def test_a_lookahead_as_long_as_the_cap_gives_the_plain_capped_proposal(workers):
    """A state rewound with `max_tokens` greedy tokens known (the fused alternatives pass what
    a full forward showed) proposes what decoding from the prompt proposes: the cap applies to
    the lookahead's tokens as to decoded ones. (Before, a lookahead without a cut was cut as a
    whole and one more token decoded, so a capped proposal could end a token later.)"""
    capped = 0
    for w in workers:
        for text in PROMPTS:
            prompt = w.text.encode(text, special=True)
            for cap in (2, 3, 4):
                a = w.open(prompt)
                plain = w.propose(a, True, cap)
                w.close(a)
                c = w.open(prompt)
                w.propose(c, True, 64)  # the model's greedy tokens and their log-probs, well past the cap
                greedy = list(zip(c.ids[len(prompt):], c.la_logprobs))[:cap]
                w.close(c)
                if len(greedy) < cap:
                    continue
                b = w.open(prompt)
                w.rewind(b, prompt, greedy)
                held = w.propose(b, True, cap)
                w.close(b)
                assert (held.text, held.eos, held.n_tokens, held.capped) == \
                    (plain.text, plain.eos, plain.n_tokens, plain.capped), (w.name, text, cap)
                capped += plain.capped
    assert capped  # some of them were capped: the case this is about

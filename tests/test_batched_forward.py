"""A batched forward over slot storage gives every request the logits it gets alone.

Tiny random models (Llama-like with GQA; Gemma3-like with sliding-window layers and a
window small enough to matter) check every operation: mixed lengths, requests joining and
leaving between forwards, scoring blocks beside decode rows, crop, move, slot reuse. The
reference is a full forward of the request's whole sequence without any cache (the truth),
and, on the real pair, today's path (one request through a DynamicCache of GrowingLayers).

Tolerance: float32 rounding only. The batched forward runs the linear layers on a different
number of rows and SDPA on other shapes, so results are close, not bitwise equal. Measured
(transformers 5.24, torch 2.13 CPU): max abs logit difference ~3e-7 on the tiny models (logits
~0.4), 3.2e-5 (SmolLM2) and 7.3e-5 / 8.4e-5 (Gemma 3, decode / blocks past the window) on the
real pair (logits ~30); greedy argmax identical in every row checked. Asserted: 1e-5 (tiny)
and 2e-3 (real), plus argmax equality on the real pair.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from coolfusion.runtime.batched_forward import Item, block_pattern, forward, install
from coolfusion.runtime.slots import KVRoomError, SlotStorage

from tiny_models import TOL_TINY, full_logits, rand_ids, tiny_gemma3, tiny_llama  # noqa: E402


@pytest.fixture(scope="module", params=["llama_gqa", "gemma3_sliding"])
def tiny(request):
    return tiny_llama() if request.param == "llama_gqa" else tiny_gemma3()


def test_mixed_prefills_then_joining_and_leaving_decodes_match_each_request_alone(tiny):
    st = SlotStorage.for_model(tiny, slots=4, max_len=64)
    seqs = {}
    # three requests of mixed lengths prefill in one forward (longer than the window of 5)
    first = [(st.alloc(), rand_ids(n, n)) for n in (1, 9, 17)]
    outs = forward(tiny, st, [Item(s, ids, rows="all") for s, ids in first])
    for (s, ids), out in zip(first, outs):
        assert out.shape == (len(ids), 97)
        assert (out - full_logits(tiny, ids)).abs().max() < TOL_TINY
        seqs[s] = ids
    for step in range(6):
        items = [Item(s, [int(full_logits(tiny, ids)[-1].argmax())]) for s, ids in seqs.items()]
        if step == 2:  # a request joins with its prefill beside the decode rows
            s = st.alloc()
            items.append(Item(s, rand_ids(12, 99)))
            seqs[s] = []
        if step == 4:  # a request leaves: its slot goes back to the pool
            gone = first[1][0]
            items = [it for it in items if it.slot != gone]
            st.free(gone)
            del seqs[gone]
        outs = forward(tiny, st, items)
        for it, out in zip(items, outs):
            seqs[it.slot] = seqs[it.slot] + it.tokens
            assert st.length(it.slot) == len(seqs[it.slot])
            ref = full_logits(tiny, seqs[it.slot])[-1]
            assert out.shape == (1, 97)
            assert (out[0] - ref).abs().max() < TOL_TINY
            assert int(out[0].argmax()) == int(ref.argmax())


def test_scoring_blocks_beside_a_decode_row_then_move_the_winner_into_place(tiny):
    st = SlotStorage.for_model(tiny, slots=3, max_len=64)
    a, b = st.alloc(), st.alloc()
    ctx_a, ctx_b = rand_ids(11, 1), rand_ids(6, 2)
    forward(tiny, st, [Item(a, ctx_a), Item(b, ctx_b)])
    # a scores three candidates; each block = anchor token at position p-1 + its new tokens,
    # with p <= len(ctx_a) (the last candidate re-tokenizes the context's last 2 tokens)
    cands = [(len(ctx_a), [5, 6, 7]), (len(ctx_a), [8]), (len(ctx_a) - 2, [9, 10, 11, 12])]
    blocks = [([ctx_a[p - 1]] + new, p) for p, new in cands]
    kv = st.length(a)
    sees = block_pattern(kv, [(p - 1, len(blk)) for blk, p in blocks])
    tokens = [t for blk, _ in blocks for t in blk]
    positions = [q for blk, p in blocks for q in range(p - 1, p - 1 + len(blk))]
    dec = int(full_logits(tiny, ctx_b)[-1].argmax())
    out_a, out_b = forward(tiny, st, [Item(a, tokens, positions, sees, rows="all"), Item(b, [dec])])
    assert (out_b[0] - full_logits(tiny, ctx_b + [dec])[-1]).abs().max() < TOL_TINY
    off = 0
    for blk, p in blocks:
        ref = full_logits(tiny, ctx_a[: p - 1] + blk)[p - 1 :]  # (len(blk), V)
        assert (out_a[off : off + len(blk)] - ref).abs().max() < TOL_TINY
        off += len(blk)
    # commit the third candidate: move its new tokens to position p, crop, decode on
    blk, p = blocks[2]
    slot_of_block = kv + len(blocks[0][0]) + len(blocks[1][0])
    st.move(a, slot_of_block + 1, p, len(blk) - 1)
    st.crop(a, p + len(blk) - 1)
    committed = ctx_a[:p] + blk[1:]
    assert st.length(a) == len(committed)
    assert torch.equal(st.positions[a, : len(committed)], torch.arange(len(committed)))
    nxt = forward(tiny, st, [Item(a, [3]), Item(b, [4])])
    assert (nxt[0][0] - full_logits(tiny, committed + [3])[-1]).abs().max() < TOL_TINY
    assert (nxt[1][0] - full_logits(tiny, ctx_b + [dec, 4])[-1]).abs().max() < TOL_TINY


def test_blocks_after_lead_tokens_see_them_as_if_they_had_been_cached_first(tiny):
    """A score folded with its sync: committed tokens not cached yet (`lead`) go first in the
    blocks' forward; each block sees the cache and the lead tokens before its first position."""
    st = SlotStorage.for_model(tiny, slots=2, max_len=64)
    a = st.alloc()
    ctx = rand_ids(11, 21)
    forward(tiny, st, [Item(a, ctx)])
    lead = rand_ids(4, 22)
    committed = ctx + lead
    kv, n = len(ctx), len(committed)
    # p-1 at the last lead token, inside the lead, and inside the cache
    cands = [(n, [5, 6, 7]), (kv + 2, [8, 9]), (kv - 1, [10])]
    blocks = [([committed[p - 1]] + new, p) for p, new in cands]
    tokens = lead + [t for blk, _ in blocks for t in blk]
    positions = list(range(kv, n)) + [q for blk, p in blocks for q in range(p - 1, p - 1 + len(blk))]
    sees = block_pattern(kv, [(p - 1, len(blk)) for blk, p in blocks], lead=len(lead))
    out = forward(tiny, st, [Item(a, tokens, positions, sees, rows=len(tokens) - len(lead))])[0]
    assert out.shape == (len(tokens) - len(lead), 97)
    off = 0
    for blk, p in blocks:
        ref = full_logits(tiny, committed[: p - 1] + blk)[p - 1 :]
        assert (out[off : off + len(blk)] - ref).abs().max() < TOL_TINY
        off += len(blk)
    st.crop(a, n)  # the lead tokens stay cached, where a sync would have put them
    nxt = forward(tiny, st, [Item(a, [3])])[0]
    assert (nxt[0] - full_logits(tiny, committed + [3])[-1]).abs().max() < TOL_TINY


def test_copy_gives_a_slot_the_prefix_of_another_and_leaves_the_source_as_it_was(tiny):
    st = SlotStorage.for_model(tiny, slots=3, max_len=40)
    a, b = st.alloc(), st.alloc()
    ids = rand_ids(20, 23)
    forward(tiny, st, [Item(a, ids), Item(b, rand_ids(7, 24))])  # b held something else before
    st.copy(a, b, 12)
    assert (st.length(a), st.length(b)) == (20, 12)
    new = rand_ids(3, 25)
    out_b, out_a = forward(tiny, st, [Item(b, new, rows="all"), Item(a, [4])])
    assert (out_b - full_logits(tiny, ids[:12] + new)[12:]).abs().max() < TOL_TINY
    assert (out_a[0] - full_logits(tiny, ids + [4])[-1]).abs().max() < TOL_TINY
    with pytest.raises(ValueError):
        st.copy(a, b, 22)  # more than the source holds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reservation without commit is Linux's")
def test_slots_larger_than_the_ram_leave_the_process_able_to_fork():
    """The storage reserves address space only: with more slots than the machine has RAM the
    process can still fork() (Ray and subprocesses start that way); with torch.empty it could
    not (ENOMEM on this project's machines, whose kernels refuse a fork whose private memory
    exceeds RAM + swap)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_slot = 2 * 8 * 8 * 4096 * 128 * 4  # keys and values x layers x KV heads x tokens x head dim x float32
    st = SlotStorage(num_layers=8, kv_heads=8, head_dim=128, slots=int(1.25 * ram) // per_slot + 1, max_len=4096)
    assert st.nbytes > ram
    s = st.alloc()
    st.k[0][s, :, :3] = 1.0  # a forward's writes commit only their pages
    assert float(st.keys(0, s, 3).sum()) == 8 * 3 * 128
    out = subprocess.run([sys.executable, "-c", "0"], preexec_fn=lambda: None)  # preexec_fn: a real fork()
    assert out.returncode == 0


def test_crop_and_refeed_is_a_fresh_sequence(tiny):
    st = SlotStorage.for_model(tiny, slots=2, max_len=40)
    s = st.alloc()
    ids = rand_ids(20, 3)
    forward(tiny, st, [Item(s, ids)])
    st.crop(s, 8)
    new = rand_ids(5, 4)
    out = forward(tiny, st, [Item(s, new, rows="all")])[0]
    assert (out - full_logits(tiny, ids[:8] + new)[8:]).abs().max() < TOL_TINY


def test_gather_layout_and_repeat_kv_give_the_same_logits_as_views(tiny):
    outs = {}
    for layout, gqa in (("views", "enable"), ("views", "repeat"), ("gather", "enable")):
        st = SlotStorage.for_model(tiny, slots=3, max_len=48)
        s0, s1, s2 = st.alloc(), st.alloc(), st.alloc()
        forward(tiny, st, [Item(s0, rand_ids(13, 5)), Item(s1, rand_ids(3, 6)), Item(s2, rand_ids(8, 7))],
                layout=layout, gqa=gqa)
        outs[layout, gqa] = torch.cat(forward(tiny, st, [Item(s0, [1]), Item(s1, [2, 3], rows="all"), Item(s2, [4])],
                                              layout=layout, gqa=gqa))
    ref = outs["views", "enable"]
    for v in outs.values():
        assert (v - ref).abs().max() < TOL_TINY


def test_a_freed_slot_is_reused_and_the_storage_never_grows(tiny):
    st = SlotStorage.for_model(tiny, slots=2, max_len=16)
    nbytes = st.nbytes
    cfg = tiny.config
    assert nbytes == SlotStorage.bytes_needed(num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                                              head_dim=st.head_dim, slots=2, max_len=16)
    a, b = st.alloc(), st.alloc()
    with pytest.raises(KVRoomError):
        st.alloc()
    forward(tiny, st, [Item(a, rand_ids(10, 8)), Item(b, rand_ids(4, 9))])
    with pytest.raises(KVRoomError):  # 10 + 7 > max_len: refused before anything runs
        forward(tiny, st, [Item(a, rand_ids(7, 10)), Item(b, [1])])
    assert (st.length(a), st.length(b)) == (10, 4)
    st.free(a)
    assert st.free_slots == 1
    c = st.alloc()
    assert c == a and st.length(c) == 0
    ids = rand_ids(9, 11)  # the reused slot holds only the new request's tokens
    out = forward(tiny, st, [Item(c, ids, rows="all")])[0]
    assert (out - full_logits(tiny, ids)).abs().max() < TOL_TINY
    assert st.nbytes == nbytes


def test_a_failed_forward_changes_no_length(tiny):
    st = SlotStorage.for_model(tiny, slots=2, max_len=32)
    a, b = st.alloc(), st.alloc()
    forward(tiny, st, [Item(a, rand_ids(5, 12)), Item(b, rand_ids(3, 13))])
    with pytest.raises(Exception):
        forward(tiny, st, [Item(a, [1]), Item(b, [10_000])])  # token id out of the vocabulary
    assert (st.length(a), st.length(b)) == (5, 3)
    out = forward(tiny, st, [Item(a, [1])])[0]
    assert (out[0] - full_logits(tiny, rand_ids(5, 12) + [1])[-1]).abs().max() < TOL_TINY


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_the_model_runs_as_before_without_a_plan(build):
    """install() keeps ordinary forwards (today's path, masks built by transformers) intact."""
    model = build()
    ids = rand_ids(12, 14)
    before = full_logits(model, ids)
    install(model)
    assert model.config._attn_implementation == "coolfusion_slots"
    assert torch.equal(full_logits(model, ids), before)


# ---- the real pair ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(engine):
    """(name, model, tokenizer) of the session's real engine (the models are loaded once)."""
    return [(w.name, w.runner.model, w.text.tokenizer) for w in engine.workers]


def alone_logits(model, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Today's path: one request in a GrowingLayer DynamicCache; prefill, then one token per step."""
    import inspect

    from coolfusion.runtime import kvcache

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = kvcache.new_cache()
    out, fed = [], []
    for chunk in [ids] + [[t] for t in steps]:
        past = len(fed)
        pos = torch.arange(past, past + len(chunk))[None]  # (1, T)
        with torch.inference_mode():
            r = model(input_ids=torch.tensor([chunk]), position_ids=pos, cache_position=pos[0], use_cache=True,
                      logits_to_keep=1, **{kw: cache})
        fed += chunk
        out.append(r.logits[0, -1].float())
    return out


@pytest.mark.slow
def test_real_pair_batched_decode_matches_each_request_alone(real_pair):
    prompts = ["The capital of France is", "def fib(n):\n    if n < 2:\n        return n\n",
               "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
    for name, model, tok in real_pair:
        enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        st = SlotStorage.for_model(model, slots=4, max_len=128)
        slots = [st.alloc() for _ in enc]
        steps = 4
        got = [[r[0] for r in forward(model, st, [Item(s, ids) for s, ids in zip(slots, enc)])]]
        fed = [[int(got[0][i].argmax())] for i in range(len(enc))]
        for _ in range(steps - 1):
            outs = forward(model, st, [Item(s, f[-1:]) for s, f in zip(slots, fed)])
            got.append([o[0] for o in outs])
            for f, o in zip(fed, outs):
                f.append(int(o[0].argmax()))
        worst, agree = 0.0, 0
        for i, ids in enumerate(enc):
            ref = alone_logits(model, ids, fed[i][:-1])
            for k in range(steps):
                worst = max(worst, float((got[k][i] - ref[k]).abs().max()))
                agree += int(got[k][i].argmax() == ref[k].argmax())
        print(f"\n{name}: batched vs alone (GrowingLayer cache): max |dlogit| {worst:.2e}, "
              f"argmax agree {agree}/{len(enc) * steps}")
        assert worst < 2e-3
        assert agree == len(enc) * steps


@pytest.mark.slow
def test_real_gemma_scoring_blocks_past_the_sliding_window_beside_decode_rows(real_pair):
    name, model, tok = real_pair[1]
    window = model.config.get_text_config().sliding_window
    long = tok(" ".join(f"item {i}," for i in range(window // 3 + 20)), add_special_tokens=False).input_ids
    long = long[: window + 40]
    assert len(long) > window
    short = tok("Hello there, how are", add_special_tokens=False).input_ids
    st = SlotStorage.for_model(model, slots=2, max_len=window + 80)
    a, b = st.alloc(), st.alloc()
    forward(model, st, [Item(a, long), Item(b, short)])
    blocks = [([long[-1]] + tok(c, add_special_tokens=False).input_ids, len(long)) for c in (" item", " and so on")]
    kv = st.length(a)
    sees = block_pattern(kv, [(p - 1, len(blk)) for blk, p in blocks])
    tokens = [t for blk, _ in blocks for t in blk]
    positions = [q for blk, p in blocks for q in range(p - 1, p - 1 + len(blk))]
    out_a, out_b = forward(model, st, [Item(a, tokens, positions, sees, rows="all"), Item(b, [3])])
    worst = float((out_b[0] - full_logits(model, short + [3])[-1]).abs().max())
    off = 0
    for blk, p in blocks:
        ref = full_logits(model, long[: p - 1] + blk)[p - 1 :]
        worst = max(worst, float((out_a[off : off + len(blk)] - ref).abs().max()))
        assert torch.equal(out_a[off : off + len(blk)].argmax(-1), ref.argmax(-1))
        off += len(blk)
    print(f"\n{name}: blocks past the window ({len(long)} > {window}) beside a decode row: max |dlogit| {worst:.2e}")
    assert worst < 2e-3


def test_at_a_fixed_row_count_a_request_s_logits_do_not_depend_on_the_other_rows(tiny):
    """Rows are computed independently: at one row count (`pad_to`), a request's logits are
    bitwise the same alone (padded) and beside any other requests, whatever their tokens and
    lengths. (Between row counts they differ by GEMM rounding, ~1e-7 here.)"""
    st = SlotStorage.for_model(tiny, slots=4, max_len=48)
    slots = [st.alloc() for _ in range(4)]
    forward(tiny, st, [Item(s, rand_ids(n, n)) for s, n in zip(slots, (6, 11, 2, 20))])
    a = slots[0]

    def step(items):
        out = forward(tiny, st, items, pad_to=4)[0]
        for it in items:
            st.crop(it.slot, st.length(it.slot) - 1)
        return out

    alone = step([Item(a, [3])])
    assert st.length(a) == 6
    for tok in (3, 50, 96):
        assert torch.equal(step([Item(a, [3])] + [Item(s, [tok]) for s in slots[1:]]), alone)
    st.crop(slots[3], 4)
    assert torch.equal(step([Item(a, [3]), Item(slots[3], [7])]), alone)
    assert (alone[0] - full_logits(tiny, rand_ids(6, 6) + [3])[-1]).abs().max() < TOL_TINY


def test_softcapped_attention_matches_transformers_eager_softcap():
    """A model that passes `softcap` gets transformers' own softcapping (Gemma's eager path)."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    from coolfusion.runtime.batched_forward import _sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn((1, 4, 3, 16), generator=g) * 3  # (1, Hq, t, D)
    k = torch.randn((1, 2, 7, 16), generator=g) * 3  # (1, Hkv, n, D)
    v = torch.randn((1, 2, 7, 16), generator=g)
    allow = torch.ones((3, 7), dtype=torch.bool).tril(4)[None, None]  # (1, 1, t, n)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    additive = torch.zeros(allow.shape).masked_fill(~allow, torch.finfo(torch.float32).min)
    ref, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.25, softcap=2.0)  # (1, t, Hq, D)
    ours = _sdpa(q, k, v, allow, 0.25, 2.0, "enable").transpose(1, 2)
    assert (ours - ref).abs().max() < 1e-5
    uncapped = _sdpa(q, k, v, allow, 0.25, None, "enable").transpose(1, 2)
    assert (uncapped - ref).abs().max() > 1e-2  # the cap changes the result at this scale

"""One forward of a model over the pending work of several requests held in a SlotStorage.

    logits = forward(model, storage, [Item(slot, tokens, ...), ...])   # one list entry per item

Each item is one request's new tokens (a decode step: 1 token; a prefill: many; scoring
blocks: many, with an attention pattern). All items' tokens go through the model as ONE
flattened sequence (batch 1, sum of T tokens), so every linear layer runs once for the whole
batch. Attention is the only place where requests differ: a custom function, registered with
transformers' `AttentionInterface` by `install(model)`, writes each layer's new keys/values
into the storage (one indexed write for all tokens) and then runs SDPA per item, against a
view of that item's own slot (no gather copy), with `enable_gqa` (no repeat_kv copy) and no
mask at all for decode rows. `layout="gather"` is the padded alternative (one SDPA over the
items' rows gathered into (B, H, L_max, D)); it is kept for measurement.

How it meets transformers (5.x; 4.56 has the same hooks):
- the model is called with `use_cache=False` and no Cache: the attention function is the KV
  cache. Keys arrive after RoPE, so the storage holds them at the positions they were
  computed at;
- `attention_mask` is a dummy 4D tensor: `create_causal_mask` returns a 4D mask as is (and
  Gemma 3 passes it to both layer types), so no mask is built for the flattened sequence;
- the plan travels as an extra keyword argument, which the model forwards untouched through
  `**kwargs` to the attention function; without it the function delegates to the model's
  previous implementation (sdpa or eager), so the model keeps working for today's path;
- the function honours what the attention module passes: `scaling`, `sliding_window`
  (Gemma 3's local layers: key position > query position - window) and `softcap`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coolfusion.runtime.slots import SlotStorage
from coolfusion.runtime.hf_compat import text_config

NAME = "coolfusion_slots"  # the attention implementation registered by `install`
PLAN_KW = "coolfusion_plan"  # keyword argument that carries the plan to the attention function


@dataclass
class Item:
    """One request's share of a forward.

    slot: the request's slot; tokens are appended after its `length` cached tokens.
    positions: RoPE position of each new token (default: length, length+1, ...).
    sees: optional (T, length+T) bool, which cached tokens and which new tokens each new token
      attends to (scoring blocks); default causal. Sliding-window layers additionally mask by
      position. Every row must see at least one token (its own, normally).
    rows: "last" -> logits (1, V) of the last token; "all" -> (T, V); an int k -> (k, V) of
      the last k tokens (scoring blocks after committed tokens fed with them).
    """

    slot: int
    tokens: list[int]
    positions: list[int] | None = None
    sees: torch.Tensor | None = None
    rows: str | int = "last"

    def kept(self) -> int:
        """Logits rows this item returns."""
        return len(self.tokens) if self.rows == "all" else 1 if self.rows == "last" else self.rows


CAUSAL = "causal"  # mask marker: plain causal over a slot that held nothing before


class Plan:
    """What the attention function needs for one forward, computed once, shared by layers."""

    def __init__(self, storage: SlotStorage, items: list[Item], before: list[int], max_pos: list[int],
                 layout: str, gqa: str):
        self.storage, self.items, self.before, self.layout, self.gqa = storage, items, before, layout, gqa
        self.max_pos = max_pos  # largest new position per item (a Python int: no device sync)
        dev = storage.device
        self.sizes = [len(it.tokens) for it in items]
        self.offsets = [0]
        for t in self.sizes:
            self.offsets.append(self.offsets[-1] + t)
        self.after = [b + t for b, t in zip(before, self.sizes)]
        slot_idx, at = [], []
        for it, b, t in zip(items, before, self.sizes):
            slot_idx += [it.slot] * t
            at += range(b, b + t)
        self.slot_idx = torch.tensor(slot_idx, device=dev)  # (T,) slot of each new token
        self.at = torch.tensor(at, device=dev)  # (T,) index in its slot's row
        self._masks: dict[int | None, list] = {}  # window -> per-item mask (None, CAUSAL or (1,1,T,n) bool)
        self._padded: dict[int | None, torch.Tensor] = {}

    def masks(self, window: int | None) -> list:
        if window not in self._masks:
            self._masks[window] = [self._mask(i, window) for i in range(len(self.items))]
        return self._masks[window]

    def _mask(self, i: int, window: int | None):
        it, b, t, n = self.items[i], self.before[i], self.sizes[i], self.after[i]
        dev = self.storage.device
        allow = it.sees
        q_pos = self.storage.positions[it.slot, b:n]  # (t,)
        if window is not None and self.max_pos[i] >= window:  # some key may be out of the window
            k_pos = self.storage.positions[it.slot, :n]  # (n,)
            win = q_pos[:, None] - k_pos[None, :] < window  # (t, n)
            if allow is None:
                allow = torch.arange(n, device=dev)[None, :] < torch.arange(b + 1, n + 1, device=dev)[:, None]
            allow = allow & win
        if allow is None:
            return None if t == 1 else (CAUSAL if b == 0 else self._causal(b, t, n))
        return allow.to(dev)[None, None]  # (1, 1, t, n)

    def _causal(self, b: int, t: int, n: int) -> torch.Tensor:
        dev = self.storage.device
        return (torch.arange(n, device=dev)[None, :] < torch.arange(b + 1, n + 1, device=dev)[:, None])[None, None]

    def padded_mask(self, window: int | None, t_max: int, n_max: int) -> torch.Tensor:
        """(B, 1, t_max, n_max) bool for the gather layout (padding rows see key 0: discarded)."""
        if window not in self._padded:
            m = torch.zeros((len(self.items), 1, t_max, n_max), dtype=torch.bool, device=self.storage.device)
            m[:, :, :, 0] = True
            for i, mi in enumerate(self.masks(window)):
                t, n = self.sizes[i], self.after[i]
                if mi is None:
                    m[i, 0, :t, :n] = True
                elif isinstance(mi, str):
                    m[i, 0, :t, :n] = self._causal(0, t, n)[0, 0]
                else:
                    m[i, 0, :t, :n] = mi[0, 0]
            self._padded[window] = m
        return self._padded[window]


def _sdpa(q, k, v, mask, scaling, softcap, gqa: str):
    """q (1, Hq, t, D) against k, v (b, Hkv, n, D); mask None, CAUSAL or bool (.., t, n)."""
    rep = q.shape[1] // k.shape[1]
    if softcap is not None:  # SDPA cannot softcap: explicit attention
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)  # (b, Hq, t, n)
        s = torch.tanh(s / softcap) * softcap
        if isinstance(mask, str):
            mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s.float(), -1).to(q.dtype) @ v
    causal = isinstance(mask, str)
    mask = None if causal else mask
    if rep > 1 and gqa == "repeat":  # what transformers' sdpa path does whenever a mask is given
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    extra = {"enable_gqa": True} if rep > 1 and gqa != "repeat" else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, **extra)


def _fallback(module, *args, **kwargs):
    prev = getattr(module.config, "_coolfusion_prev_attn", "sdpa")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if prev == "eager" or prev not in ALL_ATTENTION_FUNCTIONS:
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    else:
        fn = ALL_ATTENTION_FUNCTIONS[prev]
    return fn(module, *args, **kwargs)


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function. query (1, Hq, T, D), key/value (1, Hkv, T, D): the
    new tokens of every item, in item order. Returns ((1, T, Hq, D), None)."""
    plan: Plan | None = kwargs.get(PLAN_KW)
    if plan is None:
        return _fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    st, layer = plan.storage, module.layer_idx
    T = plan.offsets[-1]  # real tokens; rows past them are padding (`pad_to`): no KV, zero output
    st.write(layer, plan.slot_idx, plan.at, key[0, :, :T].transpose(0, 1), value[0, :, :T].transpose(0, 1))  # (T, Hkv, D)
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    masks = plan.masks(window)
    if plan.layout == "gather":
        out = _gather_attention(plan, layer, query, masks, window, scaling, softcap)
    else:
        outs = []
        for i, it in enumerate(plan.items):
            o, n = plan.offsets[i], plan.after[i]
            q = query[:, :, o : o + plan.sizes[i]]  # (1, Hq, t, D) view
            outs.append(_sdpa(q, st.k[layer][it.slot : it.slot + 1, :, :n], st.v[layer][it.slot : it.slot + 1, :, :n],
                              masks[i], scaling, softcap, plan.gqa))  # (1, Hq, t, D)
        if query.shape[2] > T:
            outs.append(query.new_zeros(query.shape[:2] + (query.shape[2] - T, query.shape[3])))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # (1, Hq, T + padding, D)
    return out.transpose(1, 2).contiguous(), None


def _gather_attention(plan: Plan, layer, query, masks, window, scaling, softcap):
    """Padded layout: the items' rows gathered into (B, Hkv, n_max, D), one SDPA call."""
    st, B = plan.storage, len(plan.items)
    t_max, n_max = max(plan.sizes), max(plan.after)
    slots = torch.tensor([it.slot for it in plan.items], device=st.device)  # (B,)
    k = st.k[layer][:, :, :n_max].index_select(0, slots)  # (B, Hkv, n_max, D): a copy
    v = st.v[layer][:, :, :n_max].index_select(0, slots)
    for i, n in enumerate(plan.after):  # past an item's length: never written (maybe NaN bits), 0 * NaN = NaN
        k[i, :, n:] = 0
        v[i, :, n:] = 0
    row = torch.repeat_interleave(torch.arange(B, device=st.device), torch.tensor(plan.sizes, device=st.device))  # (T,)
    col = torch.cat([torch.arange(t, device=st.device) for t in plan.sizes])  # (T,)
    q = query.new_zeros((B, query.shape[1], t_max, query.shape[-1]))  # (B, Hq, t_max, D)
    T = plan.offsets[-1]
    q[row, :, col] = query[0, :, :T].transpose(0, 1)  # (T, Hq, D)
    o = _sdpa(q, k, v, plan.padded_mask(window, t_max, n_max), scaling, softcap, plan.gqa)  # (B, Hq, t_max, D)
    o = o[row, :, col].transpose(0, 1)[None]  # (1, Hq, T, D)
    pad = query.shape[2] - T
    return torch.cat([o, query.new_zeros(o.shape[:2] + (pad, o.shape[3]))], 2) if pad else o


def install(model) -> None:
    """Route the model's attention through `slot_attention` (idempotent). Forwards without a
    plan still run the model's previous implementation, with its usual masks."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) == NAME:
        return
    prev = cfg._attn_implementation or "sdpa"
    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, slot_attention)
    # a mask for the fallback path: the previous implementation's; the plan path passes a 4D
    # dummy and never builds one. Registered per previous implementation (sdpa on every model here).
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[prev if prev in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"])
    for c in {id(cfg): cfg, id(text_config(cfg)): text_config(cfg)}.values():
        c._coolfusion_prev_attn = prev
        c._attn_implementation = NAME


def forward(model, storage: SlotStorage, items: list[Item], *, layout: str = "views", gqa: str = "enable",
            pad_to: int = 0) -> list[torch.Tensor]:
    """Run every item's new tokens through `model` in one forward; append their keys/values to
    their slots; return each item's logits, float32: (1, V) for rows="last", (T, V) for "all".

    layout: "views" (per-item SDPA on its own slot) or "gather" (padded, one SDPA).
    gqa: "enable" (SDPA enable_gqa) or "repeat" (repeat_kv copies, as transformers does with a mask).
    pad_to: feed dummy tokens (no KV, no attention) up to this many rows. A row's logits
      depend on the number of rows the linear layers see (GEMM blocking) but, at a fixed
      count, not on the other rows (measured on CPU: bitwise), so padding every decode
      forward to one size makes each request's logits independent of the load.
    If the forward raises, no slot's length changes (whatever was written is past the end)."""
    if not items:
        return []
    install(model)
    slots = [it.slot for it in items]
    if len(set(slots)) != len(slots):
        raise ValueError("one item per slot and forward")
    before = [storage.reserve(it.slot, len(it.tokens)) for it in items]
    for it, b in zip(items, before):
        t = len(it.tokens)
        if t == 0:
            raise ValueError("an item needs at least one token")
        if it.rows not in ("last", "all") and not (isinstance(it.rows, int) and 1 <= it.rows <= t):
            raise ValueError(f"rows must be 'last', 'all' or 1..{t}, not {it.rows!r}")
        if it.sees is not None and tuple(it.sees.shape) != (t, b + t):
            raise ValueError(f"sees must be ({t}, {b + t}), got {tuple(it.sees.shape)}")
    dev = storage.device
    ids, pos, keep, max_pos = [], [], [], []
    for it, b in zip(items, before):
        p = list(it.positions) if it.positions is not None else list(range(b, b + len(it.tokens)))
        if len(p) != len(it.tokens):
            raise ValueError("positions and tokens differ in length")
        o = len(ids)
        ids += it.tokens
        pos += p
        max_pos.append(max(p))
        keep += range(o + len(p) - it.kept(), o + len(p))
    plan = Plan(storage, items, before, max_pos, layout, gqa)
    if len(ids) < pad_to:  # dummy rows, kept through the LM head too (its row count matters as well)
        keep += range(len(ids), pad_to)
        pos += [0] * (pad_to - len(ids))
        ids += [0] * (pad_to - len(ids))
    position_ids = torch.tensor([pos], device=dev)  # (1, T)
    storage.positions[plan.slot_idx, plan.at] = position_ids[0, : plan.offsets[-1]]
    dummy = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=dev)  # (1, 1, 1, 1): skips mask creation
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=dev), position_ids=position_ids, attention_mask=dummy,
                    use_cache=False, logits_to_keep=torch.tensor(keep, device=dev), **{PLAN_KW: plan})
    for it in items:
        storage.advance(it.slot, len(it.tokens))
    logits = out.logits[0].float()  # (R, V), R = rows kept over all items
    res, r = [], 0
    for it in items:
        n = it.kept()
        res.append(logits[r : r + n])
        r += n
    return res


def block_positions(kv: int, blocks: list[tuple[int, int]], lead: int = 0) -> list[int]:
    """The position of each new token of a blocks forward (both runners): the `lead` tokens of
    the sequence at kv, kv+1, ..., then each block's (first position, length) in order."""
    return list(range(kv, kv + lead)) + [q for first, n in blocks for q in range(first, first + n)]


def block_pattern(kv: int, blocks: list[tuple[int, int]], device=None, lead: int = 0) -> torch.Tensor:
    """Who sees what, for scoring blocks appended after `kv` cached tokens (both runners):
    blocks = [(first_position, length)], each block's token j sees the cached tokens at slots
    before its first position and its own block's tokens up to j. `lead`: the new tokens
    start with that many of the sequence itself (slots and positions kv, kv+1, ...: committed
    tokens not cached yet), fed causally, and a block sees those before its first position
    too, as if they had been cached first. Returns (lead+T, kv+lead+T) bool."""
    T = sum(n for _, n in blocks)
    held = kv + lead  # what the blocks see as the cache
    allow = torch.zeros((lead + T, held + T), dtype=torch.bool, device=device)  # (lead+T, held+T)
    allow[:lead, :held] = torch.ones((lead, held), dtype=torch.bool, device=device).tril(kv)
    o = lead
    for first, n in blocks:
        allow[o : o + n, : min(first, held)] = True
        allow[o : o + n, kv + o : kv + o + n] = torch.ones((n, n), dtype=torch.bool, device=device).tril()
        o += n
    return allow

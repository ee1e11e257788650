"""The tokenizer side of one source model: text <-> tokens, word rules, end tokens, timing.

One class for every place that needs a model's tokenizer without its weights: the local
worker, the Ray master's proxy (which keeps the text-side work local), token counting for
`max_tokens` and `usage`, and the benchmark. `tok_seconds` adds up the time spent here.
"""

from __future__ import annotations

import time
from typing import Sequence

from coolfusion.core.errors import InvalidRequest
from coolfusion.core.words import REPLACEMENT, WordStarts, first_boundary


def end_tokens(name: str, tokenizer, generation_config=None, stop_tokens: Sequence[str] = ()) -> tuple[list[int], list[int]]:
    """(end ids, chat end ids): the EOS ids of the generation config and the tokenizer, then
    the configured `stop_tokens` (e.g. Gemma's <end_of_turn>), which also end a chat turn."""
    ends: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for e in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and e not in ends:
            ends.append(e)
    chat_ends = []
    for t in stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or tid == tokenizer.unk_token_id:
            raise InvalidRequest(f"stop token {t!r} is not in the vocabulary of {name!r}")
        chat_ends.append(tid)
    return ends + chat_ends, chat_ends


class TokenizerSide:
    """`encode` / `decode` through the fast backend, this model's `words` rule, and its end
    tokens: `end_ids` end a proposal, `primary_end` is scored after an ending completion,
    `chat_end` after an ending chat turn."""

    def __init__(self, name: str, tokenizer, end_ids: Sequence[int], chat_end_ids: Sequence[int] = ()):
        if not end_ids:
            raise ValueError(f"model {name!r}: no end-of-sequence token")
        self.name = name
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer  # a `tokenizers.Tokenizer`
        self.words = WordStarts(tokenizer)
        self.end_ids = frozenset(end_ids)
        self.primary_end = list(end_ids)[0]
        self.chat_end = list(chat_end_ids)[0] if chat_end_ids else self.primary_end
        self.tok_seconds = 0.0

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        t = time.perf_counter()
        ids = self._backend.encode(text, add_special_tokens=special).ids
        self.tok_seconds += time.perf_counter() - t
        return ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` and the char offset where each starts."""
        ids, starts, _ = self.encode_with_ends(text)
        return ids, starts

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        t = time.perf_counter()
        text = self._backend.decode(ids, skip_special_tokens=skip_special)
        self.tok_seconds += time.perf_counter() - t
        return text

    def encode_with_ends(self, text: str, *, special: bool = False) -> tuple[list[int], list[int], list[int]]:
        """Token ids of `text` with the char offsets where each starts and ends (special
        tokens the tokenizer adds, e.g. a BOS, start and end at 0)."""
        t = time.perf_counter()
        enc = self._backend.encode(text, add_special_tokens=special)
        self.tok_seconds += time.perf_counter() - t
        return enc.ids, [s for s, _ in enc.offsets], [e for _, e in enc.offsets]

    def text_of(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text a token-id prompt stands for (special tokens such as a BOS are not text)
        and the char offset where each token ends in it: the decoded length of the tokens up
        to it, held at the last complete character while a character is still incomplete."""
        t = time.perf_counter()
        ends, last = [], 0
        for i in range(len(ids)):
            part = self._backend.decode(ids[: i + 1], skip_special_tokens=True)
            if not part.endswith(REPLACEMENT) or i == len(ids) - 1:
                last = len(part)
            ends.append(last)
        text = self._backend.decode(ids, skip_special_tokens=True)
        self.tok_seconds += time.perf_counter() - t
        return text, ends

    def token_text(self, tid: int) -> str:
        """One token alone, as text (a special token as its name; a piece of a character as U+FFFD)."""
        return self._backend.decode([tid], skip_special_tokens=False)

    def decoded_end(self, ids: list[int]) -> int | None:
        """The char length of decode(ids), None while it ends inside a character."""
        text = self.decode(ids)
        return None if text.endswith(REPLACEMENT) else len(text)

    def first_cut(self, ids: list[int], ends: list[int | None], splitters: Sequence[WordStarts]) -> tuple[str, int] | None:
        """Where a proposal of the decoded tokens `ids` ends (`ends`: `decoded_end` after
        each): (its text, its token count) at the first word boundary common to `splitters`
        that is one of its own token ends; None while there is none."""
        if not ids or ends[-1] is None:
            return None
        whole = self.decode(ids)
        t = time.perf_counter()
        p = first_boundary(whole, splitters, allowed={e for e in ends if e is not None})
        self.tok_seconds += time.perf_counter() - t
        if p is None:
            return None
        return whole[:p], next(i + 1 for i, e in enumerate(ends) if e == p)

    def retokenize_tail(self, g_text: str, g_ids: list[int], g_starts: list[int], text: str,
                        *, fast: bool = True) -> tuple[int, list[int], list[int]]:
        """T(G + text) as (keep, tail_ids, tail_starts), meaning g_ids[:keep] + tail_ids.

        Re-tokenizes only from a restart token a few tokens back (`fast`; else all of G). The
        restart is accepted when re-tokenizing from it reproduces the token that was there (a
        stable boundary); otherwise it moves further back. Starts are offsets in G + text."""
        new_g = g_text + text
        back = 8 if fast else len(g_ids) + 1
        while True:
            r = max(0, len(g_ids) - back)
            while 0 < r < len(g_ids) and g_starts[r] == g_starts[r - 1]:
                r -= 1  # never restart inside a character split over byte tokens
            c0 = g_starts[r] if r < len(g_ids) else len(g_text)
            ids, starts = self.encode_with_starts(new_g[c0:])
            if r == 0 or (ids and r < len(g_ids) and ids[0] == g_ids[r]):
                return r, ids, [c0 + s for s in starts]
            back *= 2

"""Word boundaries of a tokenizer, and the aligned-segment rule (docs/architecture.md, section 1).

A boundary is a character offset where a word starts, taken from the tokenizer's own
token-to-word mapping (paper 2.1). The rule is derived from the tokenizer object, not from a
model family:
- If its pre-tokenizer really splits text into words (byte-level BPE with a regex, Metaspace
  with split), the words are the pre-tokenizer's pieces and a word starts where the first
  token of a piece starts (`" is"` starts at its space).
- Otherwise (SentencePiece style, e.g. Gemma converted from GGUF, whose normaliser turns
  spaces into "▁" before a no-op Split), words are whitespace-delimited: a word starts at a
  token that begins with whitespace, at a token that follows one ending in whitespace, or at
  the text start.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class WordStarts:
    """Callable: `word_starts(text) -> sorted list of word-start offsets` for one tokenizer."""

    def __init__(self, tokenizer):
        self._backend = tokenizer.backend_tokenizer  # a `tokenizers.Tokenizer`
        probe = self._backend.encode("a b", add_special_tokens=False)
        self.uses_pretokenizer_words = len({w for w in probe.word_ids if w is not None}) >= 2

    def __call__(self, text: str) -> list[int]:
        if not text:
            return []
        enc = self._backend.encode(text, add_special_tokens=False)
        starts = {0}
        if self.uses_pretokenizer_words:
            seen = set()
            for wid, (s, _e) in zip(enc.word_ids, enc.offsets):
                if wid is not None and wid not in seen:
                    seen.add(wid)
                    starts.add(s)
        else:
            prev_end_ws = False
            for s, e in enc.offsets:
                piece = text[s:e]
                if not piece:
                    continue
                if piece[0].isspace() or prev_end_ws:
                    starts.add(s)
                prev_end_ws = piece[-1].isspace()
        return sorted(x for x in starts if x < len(text))


def common_starts(text: str, splitters: Sequence[WordStarts]) -> list[int]:
    """Offsets that are word starts under every tokenizer."""
    sets = [set(ws(text)) for ws in splitters]
    return sorted(set.intersection(*sets)) if sets else []


def first_boundary(text: str, splitters: Sequence[WordStarts], allowed=None) -> int | None:
    """The aligned-segment cut of a proposal: the smallest p > 0 that is a word start of `text`
    under every tokenizer. A word start means the next word has begun, so the word ending at p
    is complete for everybody (paper: "not the" -> "not"). None while no such p exists, or
    while the text ends in an incomplete UTF-8 sequence. `allowed` restricts p to the
    proposer's own token boundaries, so that its tokens up to p can be kept as they are."""
    if not text or text.endswith(REPLACEMENT):
        return None
    for p in common_starts(text, splitters):
        if p > 0 and (allowed is None or p in allowed):
            return p
    return None

"""Word boundaries and the aligned-segment rule on the two real tokenizers (docs/architecture.md, section 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coolfusion.core.words import REPLACEMENT, WordStarts, common_starts, first_boundary

DATA = Path(__file__).resolve().parents[1] / "coolfusion" / "evaluation" / "data" / "word_starts_examples.json"  # shipped


@pytest.fixture(scope="module")
def splitters(tokenizers):
    return [WordStarts(t) for t in tokenizers]


def test_the_rule_is_derived_from_each_tokenizer(splitters):
    smol, gemma = splitters
    assert smol.uses_pretokenizer_words  # byte-level BPE: regex pieces are words
    assert not gemma.uses_pretokenizer_words  # SentencePiece: whitespace-delimited words


def test_word_starts_match_the_reference_examples(splitters):
    for ex in json.loads(DATA.read_text()):
        assert splitters[0](ex["text"]) == ex["smollm2"], ex["text"]
        assert splitters[1](ex["text"]) == ex["gemma3"], ex["text"]
        assert common_starts(ex["text"], splitters) == ex["common"], ex["text"]


@pytest.mark.parametrize(
    "text, segment",
    [
        ("Multi-tasking is hard", "Multi-tasking"),  # the paper's example
        ("not the", "not"),
        (" Paris. It is", " Paris."),
        ("3.14159 is pi", "3.14159"),  # digits split differently, no boundary inside the number
        ("He said: \"Go!\" and", "He"),
        ("def f(a, b):\n    return", "def"),
        ("x = 1", "x"),
        ("多任务处理很难。 Yes", "多任务处理很难。"),  # no spaces: the segment runs to whitespace
        ("🙂🙂 ok", "🙂🙂"),
    ],
)
def test_first_segment_ends_at_the_smallest_common_boundary(splitters, text, segment):
    p = first_boundary(text, splitters)
    assert text[:p] == segment


def test_no_segment_while_no_second_word_has_begun(splitters):
    for text in ["Multi-tasking", "多任务处理很难", "hello", "🙂", "1234"]:
        assert first_boundary(text, splitters) is None, text


def test_incomplete_utf8_tail_is_never_cut(splitters):
    assert first_boundary("hello wor" + REPLACEMENT, splitters) is None


text_strategy = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),  # everything encodable: CJK, RTL, combining marks, emoji
        st.sampled_from([" ", "  ", "\n", "\t", "\n\n", "    ", "٩", "\u0301", "👍🏽", "中文", "-", "'s", "word"]),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_every_segment_ends_at_a_boundary_common_to_both_tokenizers(splitters, text):
    starts = [ws(text) for ws in splitters]
    for s in starts:
        assert s == sorted(set(s)) and all(0 <= x < max(len(text), 1) for x in s)
    p = first_boundary(text, splitters)
    if p is None:
        assert not text or text.endswith(REPLACEMENT) or all(x == 0 for x in common_starts(text, splitters))
    else:
        assert 0 < p < len(text)
        assert all(p in s for s in starts)  # a word start under every tokenizer
        assert not any(0 < q < p for q in common_starts(text, splitters))  # and the smallest one
        text[:p].encode("utf-8")  # the segment is valid UTF-8

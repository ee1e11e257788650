"""Stop strings and max_tokens on raw segments (coolfusion.core.output), with the byte tokenizer:
one token per byte, so token counts are character counts for ASCII (fast tier)."""

from __future__ import annotations

from fakes import byte_tokenizer

from coolfusion.core.loop import RawStep
from coolfusion.core.output import finish, held
from coolfusion.workers.tokenizer_side import TokenizerSide
from coolfusion.core.types import GenerationRequest

TOK = byte_tokenizer()
REF = TokenizerSide("bytes", TOK, [TOK.eos_token_id])


def run(segments, end=None, **req):
    raw = [RawStep(t, "m", False, ()) for t in segments]
    if end is not None:
        raw[-1] = RawStep(segments[-1], "m", end == "eos", (), end)
    steps = list(finish(raw, GenerationRequest(prompt="p", **{"max_tokens": 100, **req}), REF, 1, None))
    return [s.text for s in steps], steps[-1].finish_reason, steps


def test_text_that_may_start_a_stop_string_is_held_back_until_it_is_decided():
    texts, reason, _ = run(["Hello E", "N", "D of it"], stop=("END",))
    assert texts == ["Hello ", "", ""] and reason == "stop"  # nothing of the stop string is sent
    texts, reason, _ = run(["Hello E", "N", "ough"], stop=("END",))
    assert texts == ["Hello ", "", "ENough"] and reason is None  # a false alarm: the held text follows


def test_the_earliest_of_several_stop_strings_wins_even_across_segments():
    texts, reason, _ = run(["one tw", "o three"], stop=("three", "two"))
    assert "".join(texts) == "one " and reason == "stop"


def test_max_tokens_cuts_inside_a_segment_at_the_reference_token():
    texts, reason, steps = run(["abc", "defgh", "ij"], max_tokens=5)
    assert "".join(texts) == "abcde" and reason == "length"
    assert steps[-1].completion_tokens == 5 and len(steps) == 2


def test_the_loops_end_sets_the_finish_reason_and_releases_held_text():
    texts, reason, steps = run(["so it ", "goes S"], end="eos", stop=("STOP",))
    assert "".join(texts) == "so it goes S" and reason == "stop" and steps[-1].eos
    texts, reason, _ = run(["so it ", "goes S"], end="context_full", stop=("STOP",))
    assert "".join(texts) == "so it goes S" and reason == "length"


def test_held_is_the_longest_suffix_that_is_a_proper_prefix_of_a_stop_string():
    assert held("abc EN", ["END"]) == 2
    assert held("abc END", ["END"]) == 0  # a whole stop string is not "held": it is found
    assert held("xx<|e", ["<|end|>", "<"]) == 3
    assert held("plain", ["END"]) == 0

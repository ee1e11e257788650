"""Hostile text through word boundaries, proposals (the segment code) and the engine (issue 7).

Emoji (ZWJ sequences, flags, skin tones), CJK, RTL with bidi controls, combining marks,
long whitespace runs, control characters, zero-width characters, and lone surrogates:
- word starts and the aligned-segment cut (coolfusion/core/words.py) on both real tokenizers: no
  crash, offsets sorted and in range, the cut a word start common to both;
- a real LocalWorker's propose/commit loop (coolfusion/workers/local.py) driven by a scripted stand-in
  for the model, so the "model" writes exactly the hostile text (or arbitrary byte tokens,
  including ones that are not UTF-8): every proposal is valid UTF-8, the proposals rejoin
  into the model's text, and no proposal runs past the cap by more than one character;
- lone surrogates (not Unicode text, cannot be UTF-8) are refused: by Engine.check with
  InvalidRequest naming the field, and by the server with 400 before the engine sees them;
- a few real generations (both models, CPU) from hostile prompts: valid UTF-8 out, also
  on the wire of an HTTP stream.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fakes import FakeEngine, byte_token_ids, scripted_worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coolfusion.config import ServerConfig
from coolfusion.core.errors import InvalidRequest
from coolfusion.core.types import GenerationRequest, Message
from coolfusion.core.words import REPLACEMENT, WordStarts, common_starts, first_boundary
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread, sse_data

FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_WORKER = settings(FUZZ, max_examples=60)  # each example runs a whole propose/commit loop

PIECES = [
    "👩‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "👍🏽", "😀😃", "🤖", "\U0001F9D1\u200D\U0001F4BB",  # emoji
    "多任务处理很难。", "日本語のテキスト", "한국어", "中文，标点！",  # CJK
    "مرحبا بالعالم", "שלום עולם", "\u202eevil\u202c", "\u200f\u200e", "\u2067\u2069",  # RTL, bidi controls
    "e\u0301\u0302\u0303", "Z\u0324\u0354\u0367\u0311", "a\u20dd", "\u0301",  # combining marks
    " ", "  ", "\t", "\n", "\r\n", "\n\n\n", "\u3000", "\u00a0", "\u2028", "\u2029", "\u0085",  # whitespace
    "\x00", "\x07", "\x1b[31m", "\x7f", "\x9b", "\x08\x0c",  # control characters
    "\ufeff", "\u200b", "\u200d", "\ufffd", "\U0010ffff", "\uffff",  # BOM, zero-width, specials
    "word", " is", "-", "'s", "3.14", "def f():",
]

hostile_text = st.lists(
    st.one_of(
        st.sampled_from(PIECES),
        st.characters(codec="utf-8"),  # anything encodable (never a surrogate)
        st.characters(categories=["Cc", "Cf", "Mn", "Me", "Zs", "Zl", "Zp", "So"]),
        st.integers(1, 300).map(lambda n: " " * n),  # long whitespace runs
        st.tuples(st.sampled_from([" ", "\n", "\t"]), st.integers(2, 60)).map(lambda t: t[0] * t[1]),
    ),
    min_size=1,
    max_size=30,
).map("".join)

SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)


def valid_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.fixture(scope="module")
def splitters(tokenizers):
    return [WordStarts(t) for t in tokenizers]


# ---- word boundaries -------------------------------------------------------------------------


@FUZZ
@given(text=hostile_text)
def test_word_starts_of_hostile_text_are_sorted_offsets_and_the_cut_is_a_common_start(splitters, text):
    per_tokenizer = [ws(text) for ws in splitters]
    for starts in per_tokenizer:
        assert starts == sorted(set(starts)) and starts[0] == 0
        assert all(0 <= x < len(text) for x in starts)
    common = common_starts(text, splitters)
    assert common == sorted(set.intersection(*map(set, per_tokenizer)))
    p = first_boundary(text, splitters)
    if p is not None:
        assert 0 < p < len(text) and p == min(x for x in common if x > 0)
        assert valid_utf8(text[:p]) and valid_utf8(text[p:])
    assert first_boundary(text + REPLACEMENT, splitters) is None  # an incomplete tail is never cut


# ---- proposals: a real worker, driven by a scripted "model" -------------------------------------


CAP = 8  # max_segment_tokens for these runs


def propose_all(tokenizer, splitters, written: list[int]) -> tuple[list, str]:
    """Let a worker propose and commit (its own proposal wins every step) until the scripted
    model's end token; returns the proposals and the text the model wrote."""
    prompt = tokenizer.backend_tokenizer.encode("Say:", add_special_tokens=True).ids
    worker = scripted_worker("scripted", tokenizer, prompt + written, splitters)
    state = worker.open(prompt)
    proposals = []
    try:
        for _ in range(len(written) + 2):  # every step consumes at least one token
            prop = worker.propose(state, True, CAP)
            proposals.append(prop)
            if prop.eos:
                break
            worker.commit(state, prop.text)
    finally:
        worker.close(state)
    assert proposals and proposals[-1].eos, "the proposals never reached the model's end token"
    return proposals, tokenizer.backend_tokenizer.decode(written, skip_special_tokens=False)


@FUZZ_WORKER
@given(text=hostile_text, which=st.sampled_from([0, 1]))
def test_proposals_of_a_model_writing_hostile_text_rejoin_into_it_as_valid_utf8(tokenizers, splitters, text, which):
    tok = tokenizers[which]
    written = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    proposals, decoded = propose_all(tok, splitters, written)
    assert all(valid_utf8(p.text) for p in proposals)
    # a U+FFFD the model writes last is dropped: the worker cannot tell it from an unfinished character
    assert "".join(p.text for p in proposals) == decoded.rstrip(REPLACEMENT)
    for p in proposals[:-1]:
        assert p.text  # every step moves on
        assert p.n_tokens is not None and p.n_tokens <= CAP + 3  # the cap, plus at most one unfinished character


@FUZZ_WORKER
@given(data=st.data(), which=st.sampled_from([0, 1]))
def test_arbitrary_byte_tokens_give_valid_utf8_proposals_that_stay_near_the_cap(tokenizers, splitters, data, which):
    """A model may write bytes that are not UTF-8 (stray continuation bytes, truncated
    sequences): proposals stay valid text, and none runs past the cap by more than the three
    extra bytes a character can need."""
    tok = tokenizers[which]
    by_value = byte_token_ids(tok)  # by byte value, the unknown id where a byte has no token
    byte_ids = [i for i in by_value if i != tok.unk_token_id]
    continuation = [i for i in by_value[0x80:0xC0] if i != tok.unk_token_id]  # never start a character
    word_ids = tok.backend_tokenizer.encode(" the cat 🙂 多", add_special_tokens=False).ids
    written = data.draw(st.lists(st.one_of(st.sampled_from(byte_ids), st.sampled_from(continuation),
                                           st.sampled_from(word_ids)), min_size=1, max_size=40))
    proposals, _ = propose_all(tok, splitters, written)
    assert all(valid_utf8(p.text) for p in proposals)
    steps_tokens = [p.n_tokens for p in proposals[:-1]]
    assert all(n is not None and n <= CAP + 3 for n in steps_tokens), steps_tokens


# ---- lone surrogates are refused --------------------------------------------------------------


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile_text, surrogate=SURROGATES, at=st.floats(0, 1), field=st.sampled_from(["prompt", "message", "stop"]))
def test_engine_check_refuses_a_lone_surrogate_anywhere_with_invalid_request(engine, text, surrogate, at, field):
    i = int(at * len(text))
    bad = text[:i] + surrogate + text[i:]
    if field == "prompt":
        req, param = GenerationRequest(prompt=bad, max_tokens=4), "prompt"
    elif field == "message":
        req = GenerationRequest(messages=(Message("system", "Be brief."), Message("user", bad)), max_tokens=4)
        param = "messages.1.content"
    else:
        req, param = GenerationRequest(prompt="Hello", stop=("\n", bad), max_tokens=4), "stop.1"
    with pytest.raises(InvalidRequest) as err:
        engine.check(req)
    assert err.value.param == param and err.value.status == 400
    assert valid_utf8(err.value.message)


SURROGATE_BODIES = [
    ("/v1/completions", '{"prompt": "abc\\ud800def", "max_tokens": 4}', "prompt"),
    ("/v1/completions", '{"prompt": ["fine", "\\udfff"], "max_tokens": 4}', "prompt"),
    ("/v1/completions", '{"prompt": "fine", "stop": ["\\ud83d"], "max_tokens": 4}', "stop"),
    ("/v1/completions", '{"prompt": "fine", "model": "cool\\udc00", "max_tokens": 4}', "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud83d there"}]}', "messages.0.content"),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ude00"}]}]}', "messages.0.content"),
]


@pytest.fixture(scope="module")
def fake_server():
    engine = FakeEngine()
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        yield url, engine


@pytest.mark.parametrize("path, body, param", SURROGATE_BODIES)
def test_the_server_refuses_a_lone_surrogate_with_400_before_the_engine(fake_server, path, body, param):
    url, engine = fake_server
    started = engine.started
    r = httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    r.content.decode("utf-8")  # the error body itself is valid UTF-8
    assert r.json()["error"]["param"].startswith(param)
    assert engine.started == started  # refused before any generation


# ---- the real engine on hostile prompts -------------------------------------------------------------


HOSTILE_PROMPTS = [
    "\x00\x01\x07\x1b[31m control \x7f\x08\x0c chars:",
    "مرحبا بالعالم! שלום עולם \u202eevil\u202c says",
    "👩‍👩‍👧‍👦🏳️‍🌈🇫🇷👍🏽 emoji:",
    " " * 2000,
    "Ze\u0301\u0302\u0303 Z\u0324\u0354\u0367\u0311a\u0308\u0356\u032d combining",
    "\ufeff\u200b\u200d\u2028\u2029\ufffd zero width",
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS, ids=["control", "rtl", "emoji", "2000-spaces", "combining", "zero-width"])
def test_hostile_prompts_generate_valid_utf8_with_the_real_engine(engine, prompt):
    steps = list(engine.generate(GenerationRequest(prompt=prompt, max_tokens=4)))
    assert steps and steps[-1].finish_reason in ("stop", "length")
    text = "".join(s.text for s in steps)
    assert valid_utf8(text) and all(valid_utf8(s.text) for s in steps)
    assert engine.active_requests == 0


def test_a_hostile_chat_stream_is_valid_utf8_on_the_wire_with_the_real_engine(engine):
    body = {"messages": [{"role": "user", "content": "多任务处理很难。\x00\x1b \u202eRTL\u202c 👩‍👩‍👧‍👦 " + " " * 200}],
            "max_tokens": 4, "stream": True}
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            raw = r.read()
    text = raw.decode("utf-8")  # strict: raises on any invalid byte
    events = list(sse_data(text.splitlines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("which", [0, 1])
def test_a_long_run_of_stray_continuation_bytes_is_not_one_runaway_proposal(tokenizers, splitters, which):
    """A model stuck on a byte that can never complete a character (0x80 alone) must still be
    cut at the cap: otherwise one proposal runs on without bound, past any cancellation."""
    tok = tokenizers[which]
    stray = byte_token_ids(tok)[0x80]
    written = [stray] * 40 + tok.backend_tokenizer.encode(" the end", add_special_tokens=False).ids
    proposals, decoded = propose_all(tok, splitters, written)
    assert all(valid_utf8(p.text) for p in proposals)
    assert "".join(p.text for p in proposals) == decoded
    assert max(p.n_tokens or 0 for p in proposals) <= CAP + 3, [p.n_tokens for p in proposals]

"""Stand-ins shared by the tests: a fake engine (HTTP only), a scripted model, a byte tokenizer.

- `ScriptedModel`: a causal "LM" that writes a given token sequence, for driving a real
  `LocalWorker` (its propose / score / commit code) without weights.
- `byte_tokenizer()`: a real fast tokenizer built in memory (byte-level, one token per
  byte, words split at spaces), so the fast tests need no tokenizer files.
- `FakeEngine`: the engine's interface with no models, for tests where only HTTP is under test.

FakeEngine implements the engine's protocol (coolfusion.engine.client.EngineClient; a test checks it)
with the engine's own request checks (coolfusion.core.validation) and typed errors, and no models. The reply is deterministic and depends on the request:
"<model> heard: <prompt words reversed> [la la ...]", split into word segments (a word with
its leading space, as byte-level BPE words are). One segment = one "token"; the prompt's token
count is its number of words (+2 per chat message). Segment winners alternate between the
sources. Magic prompt words: EXPLODE raises a RuntimeError (an engine bug) after one segment;
WORKERFAIL raises a FusionError (500) after one segment.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Iterator

import torch

from coolfusion.core import selection, validation
from coolfusion.core.errors import Cancelled, FusionError, InvalidRequest, UnknownModel
from coolfusion.core.types import VARIANTS, Candidate, GenerationRequest, Step
from coolfusion.engine.client import Checked

_WORD = re.compile(r"\s*\S+")


# ---- a scripted model and a byte tokenizer ------------------------------------------------------


class ScriptedModel:
    """Stands in for a causal LM: after position i of `seq` it predicts seq[i + 1] (greedy),
    past the end `end_id`. Keeps a real DynamicCache in step, as a model would. `score`
    (optional) maps a token to the logit it gets where it is not the scripted one, so
    candidates other than the script get finite, distinct perplexities."""

    def __init__(self, seq: list[int], end_id: int, vocab: int, *, check_feed: bool = True):
        self.seq, self.end_id, self.vocab, self.check_feed = seq, end_id, vocab, check_feed
        self.config = SimpleNamespace()
        self.dtype = torch.float32

    def __call__(self, input_ids, past_key_values, cache_position, position_ids=None, **_):
        T = input_ids.shape[1]
        past_key_values.update(torch.zeros(1, 1, T, 1), torch.zeros(1, 1, T, 1), 0)
        logits = torch.zeros(1, T, self.vocab)  # (1, T, V)
        positions = (position_ids[0] if position_ids is not None else cache_position).tolist()
        for j, pos in enumerate(positions):
            if self.check_feed:
                assert pos < len(self.seq) and input_ids[0, j] == self.seq[pos], \
                    "the worker fed a token the model did not write"
            nxt = self.seq[pos + 1] if pos + 1 < len(self.seq) else self.end_id
            logits[0, j, nxt] = 10.0
        return SimpleNamespace(logits=logits)


def byte_tokenizer():
    """A fast tokenizer with one token per byte (GPT-2's byte alphabet), words split before
    spaces as byte-level BPE does, and `</s>` (id 256) as EOS. Built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def byte_token_ids(tokenizer) -> list[int]:
    """The 256 single-byte tokens: SentencePiece byte fallback (<0xNN>) or byte-level BPE."""
    unk = tokenizer.unk_token_id
    ids = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    if all(i is not None and i != unk for i in ids):
        return ids
    # byte-level BPE (GPT-2): printable bytes stand for themselves, the rest for chr(256 + k)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, k = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + k)
            k += 1
    vocab = tokenizer.get_vocab()  # bytes never seen in training (0xC0, 0xF5-0xFF, ...) may be missing
    ids = [vocab.get(table[b], unk) for b in range(256)]
    assert sum(i != unk for i in ids) > 200, "no byte tokens found"
    return ids


def scripted_worker(name: str, tokenizer, seq: list[int], splitters=None, *, fast: bool = True,
                    context_limit: int | None = None, **kw):
    """A real LocalWorker over a ScriptedModel that writes `seq` (prompt + continuation)."""
    from coolfusion.runtime.loading import LoadedModel
    from coolfusion.workers.local import LocalWorker
    from coolfusion.workers.protocol import WorkerOptions

    model = ScriptedModel(seq, tokenizer.eos_token_id, len(tokenizer), **kw)
    options = WorkerOptions(tuple(splitters or ()), fast)
    loaded = LoadedModel(name, model, tokenizer, torch.device("cpu"), context_limit=context_limit)
    return LocalWorker.from_loaded(loaded, options)


def scripted_engine(*scripts: str, prompt: str = "Say:", fast: bool = True, max_segment_tokens: int = 8,
                    context_limit: int | None = None):
    """An Engine over scripted models m0, m1, ... on the byte tokenizer: model i writes
    `scripts[i]` after `prompt`, and gives every other token the same low logit."""
    from coolfusion.config import FusionConfig
    from coolfusion.engine.engine import Engine
    from coolfusion.core.words import WordStarts

    tok = byte_tokenizer()
    ids = tok.backend_tokenizer.encode(prompt).ids
    words = [WordStarts(tok)] * len(scripts)
    workers = [scripted_worker(f"m{i}", tok, ids + tok.backend_tokenizer.encode(s).ids, words, fast=fast,
                               check_feed=False, context_limit=context_limit) for i, s in enumerate(scripts)]
    return Engine(workers, FusionConfig(max_segment_tokens=max_segment_tokens, fast_paths=fast, parallel=False))


# ---- the fake engine -----------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text)


class FakeEngine:
    def __init__(
        self,
        *,
        sources: tuple[str, ...] = ("alpha", "beta"),
        delay_s: float = 0.0,
        filler_words: int = 0,
        context_limit: int = 4096,
        default_max_tokens: int = 64,
    ):
        self.source_names = list(sources)
        self.delay_s = delay_s
        self.filler_words = filler_words
        self.context_limit = context_limit
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()
        self._active = 0
        self.started = 0  # generations that began
        self.outcomes: list[str] = []  # per generation: finished | cancelled | closed | error
        self.segments_produced = 0
        self.unavailable: str | None = None  # a reason: the engine cannot serve now (/health 503)

    # ---- the Engine interface -------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [*VARIANTS, *self.source_names]

    def kv_report(self) -> dict[str, dict[str, int]]:
        return {}  # no runner holds KV slots here

    @property
    def active_requests(self) -> int:
        with self._lock:
            return self._active

    def close(self) -> None:
        pass

    def check(self, req: GenerationRequest | Checked, where: str = "prompt") -> Checked:
        """The engine's own request checks (coolfusion.core.validation), then the fake's limits."""
        if isinstance(req, Checked):
            return req
        request = req
        if request.model not in self.model_ids():
            raise UnknownModel(f"The model '{request.model}' does not exist", param="model")
        if request.prompt_ids is not None or request.logprobs is not None or request.echo:
            raise InvalidRequest("the fake engine has no log-probs or token ids", param="prompt")
        if request.max_tokens is None:
            request = replace(request, max_tokens=self.default_max_tokens)
        if request.max_tokens < 1:  # 0 is the real engine's echo-only request
            raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
        validation.check_fields(request, fused=request.model in VARIANTS)
        selection.check(request.selection, self.source_names)  # fusion.* values, as the engine checks them
        n = self.prompt_tokens(request)
        validation.check_context(request, self.source_names[0], n, self.context_limit)
        return Checked(request, {}, n)

    def generate(self, req: GenerationRequest | Checked, cancel: threading.Event | None = None) -> Iterator[Step]:
        checked = self.check(req)
        request, prompt_tokens = checked.request, checked.prompt_tokens
        segments = words(self.reply(request))
        with self._lock:
            self._active += 1
            self.started += 1
        outcome = "finished"
        try:
            out = ""
            for i, seg in enumerate(segments):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                if self.delay_s:
                    time.sleep(self.delay_s)
                if i == 1 and "EXPLODE" in self._text(request):
                    raise RuntimeError("fake engine exploded")
                if i == 1 and "WORKERFAIL" in self._text(request):
                    raise FusionError("a source model worker failed", code="worker_failed")
                text, finish = seg, None
                eos = i == len(segments) - 1
                cut = _stop_cut(out + text, request.stop)
                if cut is not None:
                    text, finish, eos = (out + text)[:cut][len(out):], "stop", False
                elif eos:
                    finish = "stop"
                elif i + 1 >= request.max_tokens:
                    finish = "length"
                out += text
                with self._lock:
                    self.segments_produced += 1
                yield self._step(request, i, text, eos, finish, i + 1, prompt_tokens)
                if finish is not None:
                    return
        except Cancelled:
            outcome = "cancelled"
            raise
        except GeneratorExit:
            outcome = "closed"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            with self._lock:
                self._active -= 1
                self.outcomes.append(outcome)

    # ---- helpers for tests ----------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> int:
        if request.prompt is not None:
            return len(words(request.prompt))
        return sum(len(words(m.content)) + 2 for m in request.messages or ())

    def reply(self, request: GenerationRequest) -> str:
        """The full text this engine would write for `request` with no limits."""
        heard = " ".join(reversed(self._text(request).split())) or "nothing"
        return f"{request.model} heard: {heard}" + " la" * self.filler_words + "."

    def expected_text(self, request: GenerationRequest) -> str:
        """What the client should receive, with max_tokens and stop strings applied."""
        segs = words(self.reply(request))[: request.max_tokens]
        text = "".join(segs)
        cut = _stop_cut(text, request.stop)
        return text if cut is None else text[:cut]

    def _text(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return " ".join(m.content for m in request.messages or ())

    def _step(self, request: GenerationRequest, i: int, text: str, eos: bool, finish: str | None,
              completion_tokens: int, prompt_tokens: int) -> Step:
        if request.model in self.source_names:
            winner = request.model
            candidates = (Candidate(text=text, proposed_by=(winner,), eos=eos),)
        else:
            winner = self.source_names[i % len(self.source_names)]
            loser = self.source_names[(i + 1) % len(self.source_names)]
            other = text.upper() if text.upper() != text else text + "!"
            candidates = (
                Candidate(text=text, proposed_by=(winner,), eos=eos, ppl={winner: 2.0, loser: 3.0}, mean_ppl=2.5,
                          score=2.5),
                Candidate(text=other, proposed_by=(loser,), ppl={winner: 9.0, loser: float("inf")}, mean_ppl=float("inf"),
                          score=float("inf")),
            )
        selection = None if request.model in self.source_names else {"rule": "mean_ppl"}  # as the engine
        return Step(text=text, winner=winner, eos=eos, candidates=candidates if request.trace else (),
                    finish_reason=finish, completion_tokens=completion_tokens, prompt_tokens=prompt_tokens,
                    selection=selection)


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None

"""Plain data crossing the engine's public boundary: requests in, steps and stats out.

`engine.generate(request)` yields `Step`s; `Step.candidates` is the fusion trace of that step.
`engine.start(request)` also gives the request's `Stats` (time per phase, steps).
Everything here is text and numbers, so it serialises as-is (`dataclasses.asdict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coolfusion.core.selection import SelectionRequest

# Model ids of the fused variants (docs/architecture.md, section 1).
COOL = "cool-fusion"
COOL_RERANK = "cool-fusion-rerank"
RERANK = "rerank"
COOL_NOALIGN = "cool-fusion-noalign"
VARIANTS = (COOL, COOL_RERANK, RERANK, COOL_NOALIGN)


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of `prompt` (completion) or `messages` (chat) is set.

    `model` is a variant id (VARIANTS) or a source model's config name.
    `max_tokens` counts tokens of the reference tokenizer (the first configured model's);
    None means the engine's default (config `fusion.default_max_tokens`); 0 only with `echo`.

    `prompt_ids`: a prompt given as token ids of the reference tokenizer of `model` (the
    model's own for a source-model id); the engine fills `prompt` with their text, and the
    reference model reads exactly these ids. `logprobs`: None for none, else every Step
    carries the log-probs of its text with that many top alternatives (coolfusion.engine.likelihood);
    `echo`: the first Step also carries the prompt's (completions only).
    """

    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[Message, ...] | None = None
    model: str = COOL
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    trace: bool = False
    judge: bool = False  # score the whole output with every source model (last Step.judge)
    selection: SelectionRequest = SelectionRequest()  # `fusion.select` etc.; unset: the config's
    logprobs: int | None = None
    echo: bool = False
    speculative: bool | None = None  # greedy fused ids: draft-and-check proposals; None: the config's


@dataclass(frozen=True)
class Candidate:
    """One distinct candidate of a step, as assessed by every source model."""

    text: str
    proposed_by: tuple[str, ...]
    eos: bool = False
    ppl: dict[str, float] = field(default_factory=dict)  # model name -> perplexity (models that voted)
    mean_ppl: float | None = None  # None when scoring was skipped (all proposals agreed)
    score: float | None = None  # the selection rule's combined score (coolfusion.core.selection); lowest wins


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a choice's text and its log-probability (coolfusion.engine.likelihood).

    `offset` is its character offset in the choice's text (the prompt first, with echo);
    `logprob` is None for the first token of a prompt (it has no context); `top` holds the
    requested most likely alternatives at this position, most likely first."""

    token: str
    logprob: float | None
    offset: int
    top: tuple[tuple[str, float], ...] | None = ()
    token_id: int = -1


@dataclass
class Stats:
    """What one request cost: seconds per phase of the fusion loop (summed over the
    workers' parallel calls as wall time), selected segments, and segments on which every
    proposal agreed (no scoring needed)."""

    propose_s: float = 0.0
    score_s: float = 0.0
    commit_s: float = 0.0
    steps: int = 0
    agreed: int = 0

    def add(self, phase: str, seconds: float) -> None:
        setattr(self, f"{phase}_s", getattr(self, f"{phase}_s") + seconds)


@dataclass(frozen=True)
class Step:
    """One selected segment.

    `text` is what the client should append now (already cut at a stop string or at
    max_tokens). `finish_reason` is None until the last step, then "stop" or "length".
    """

    text: str
    winner: str
    eos: bool
    candidates: tuple[Candidate, ...]
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # reference-tokenizer tokens of the whole output so far
    prompt_tokens: int = 0  # reference-tokenizer tokens of the prompt
    judge: Candidate | None = None  # on the last step of a `judge` request: the whole output's PPLs
    selection: dict | None = None  # the rule that chose (`Selection.describe()`), on traced fused steps
    end_id: int | None = None  # a single model's end token that ended the output (eos)
    logprobs: tuple[TokenLogprob, ...] = ()  # with `logprobs`: the tokens of `echo` + `text`
    echo: str = ""  # with `echo`, on the first step: the prompt's text
    # with speculative proposals: {"drafter": model, "checked": {model: n}, "accepted": {model: n}}
    speculation: dict | None = None

"""How a step's winner is chosen from the source models' perplexities (`fusion.select`).

Every model scores every distinct candidate (coolfusion.core.loop); a rule combines one candidate's
per-model perplexities into one score, and the lowest score wins (ties: the earlier
proposer). The rules, for a candidate c and the models v that scored it:

    mean_ppl      sum_v PPL_v(c) / k                     the paper's Eq. 3 (DEFAULT_RULE)
    geo_mean_ppl  exp(sum_v log PPL_v(c) / k)             a product of experts: no model's
                                                          surprise dominates the others
    max_ppl       max_v PPL_v(c)                          the candidate whose worst score is best
    min_ppl       min_v PPL_v(c)                          the candidate some model is most sure of
    weighted      sum_v w_v PPL_v(c) / sum_v w_v          Eq. 3 with per-model weights

Weights come from config (`fusion.weights`, default 1 each), the request
(`fusion.weights: {model: w}`), or `auto`: per request, from how well each model predicts the
request's own prompt, as in Pack of LLMs (arXiv 2404.11531, PackLLM-sim):

    w_v = softmax_v(-L_v / T),  L_v = (sum of model v's NLL over its prompt tokens) / n

with n the prompt's token count in the reference tokenizer (so that models with different
tokenizers are compared per the same unit) and T = `fusion.auto_temperature` (DEFAULT_AUTO_TEMPERATURE).
A model with weight 0 does not count.

How a turn ends (`fusion.end_scoring`, and `fusion.score_end: {model: false}`): a candidate
that ends the turn is scored

    end_token   with each model's end token appended to its text (a model that rarely
                predicts its end token vetoes endings)
    text        on its text alone, the end flag following the winner's proposer (the
                paper's reading); an ending with no text is scored by the end token, as that
                is all there is to score

and a model listed with `score_end: false` scores every ending on its text only and does not
vote on an ending with no text. A candidate no model votes on is never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, get_args

from coolfusion.core.errors import InvalidRequest

# The rule names and the defaults, written here once: the config (coolfusion.config), the
# request schema (coolfusion.server.schemas) and docs/configuration.md take them from here.
Rule = Literal["mean_ppl", "geo_mean_ppl", "max_ppl", "min_ppl", "weighted"]
RULES: tuple[str, ...] = get_args(Rule)
DEFAULT_RULE: Rule = "mean_ppl"
EndScoring = Literal["end_token", "text"]
END_SCORING: tuple[str, ...] = get_args(EndScoring)
DEFAULT_END_SCORING: EndScoring = "text"
DEFAULT_AUTO_TEMPERATURE = 1.0
AUTO = "auto"


@dataclass(frozen=True)
class Selection:
    """One request's selection rule, resolved (weights are numbers here, `auto` computed)."""

    rule: str = DEFAULT_RULE
    weights: Mapping[str, float] = field(default_factory=dict)  # model -> weight (weighted only)
    end_scoring: str = DEFAULT_END_SCORING
    no_end: frozenset[str] = frozenset()  # models whose end predictions do not count

    def combine(self, ppl: Mapping[str, float]) -> float:
        """The candidate's score from the perplexities of the models that scored it."""
        vals = list(ppl.values())
        if not vals:
            return math.inf  # nobody voted: never chosen
        if self.rule == "mean_ppl":
            return sum(vals) / len(vals)
        if self.rule == "geo_mean_ppl":
            return math.exp(sum(_log(v) for v in vals) / len(vals))
        if self.rule == "max_ppl":
            return max(vals)
        if self.rule == "min_ppl":
            return min(vals)
        pairs = [(self.weights.get(m, 1.0), v) for m, v in ppl.items()]
        pairs = [(w, v) for w, v in pairs if w > 0]
        total = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / total if total > 0 else math.inf

    def scores_end(self, model: str, text: str) -> bool | None:
        """Whether `model` scores an ending candidate with text `text` including its end
        token (True), on the text only (False), or not at all (None: it does not vote)."""
        if model in self.no_end:
            return False if text else None
        return self.end_scoring == "end_token" or not text

    def as_request(self) -> "SelectionRequest":
        """This selection as a request's settings (auto weights as the numbers they came to),
        for the requests one request makes (Cool+Rerank's Cool answer)."""
        return SelectionRequest(self.rule, dict(self.weights) if self.rule == "weighted" else None,
                                self.end_scoring, {m: False for m in self.no_end})

    def describe(self) -> dict:
        """The rule as the trace records it."""
        out: dict = {"rule": self.rule}
        if self.rule == "weighted":
            out["weights"] = dict(self.weights)
        return out


@dataclass(frozen=True)
class SelectionRequest:
    """What a request (or the config) asks for, before `auto` weights are computed.
    None: the config's value."""

    select: str | None = None
    weights: Mapping[str, float] | str | None = None  # {model: w} or "auto"
    end_scoring: str | None = None
    score_end: Mapping[str, bool] | None = None


def check(req: SelectionRequest, models: Sequence[str], default_rule: str = DEFAULT_RULE) -> None:
    """Raise InvalidRequest (a 400) naming the bad `fusion.*` field; `default_rule` is the
    config's `fusion.select`, which applies when the request gives none."""
    if req.select is not None and req.select not in RULES:
        raise InvalidRequest(f"fusion.select must be one of {', '.join(RULES)}, not {req.select!r}",
                             param="fusion.select")
    if req.end_scoring is not None and req.end_scoring not in END_SCORING:
        raise InvalidRequest(f"fusion.end_scoring must be one of {', '.join(END_SCORING)}, not {req.end_scoring!r}",
                             param="fusion.end_scoring")
    if req.weights is not None:
        rule = req.select or default_rule
        if rule != "weighted":
            raise InvalidRequest(f"fusion.weights apply to fusion.select 'weighted' (this request's rule is "
                                 f"{rule!r}); add \"select\": \"weighted\"", param="fusion.weights")
        if isinstance(req.weights, str):
            if req.weights != AUTO:
                raise InvalidRequest(f"fusion.weights must be a mapping {{model: weight}} or 'auto', "
                                     f"not {req.weights!r}", param="fusion.weights")
        else:
            check_weights(req.weights, models, "fusion.weights")
    check_names(req.score_end or {}, models, "fusion.score_end")
    for name, counts in (req.score_end or {}).items():
        if not isinstance(counts, bool):
            raise InvalidRequest(f"fusion.score_end.{name} must be true or false", param="fusion.score_end")


def check_names(per_model: Mapping[str, object], models: Sequence[str], param: str) -> None:
    """Every key of a per-model setting (`param`) names a source model."""
    for name in per_model:
        if name not in models:
            raise InvalidRequest(f"{param}.{name}: {name!r} is not a source model "
                                 f"(they are: {', '.join(models)})", param=param)


def check_weights(weights: Mapping[str, float], models: Sequence[str], param: str) -> None:
    """Per-model weights (`param`): source models, finite, >= 0, one of them above 0."""
    check_names(weights, models, param)
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InvalidRequest(f"{param}.{name} must be a finite number >= 0, not {w!r}", param=param)
    if weights and not any(weights.get(m, 1.0) > 0 for m in models):
        raise InvalidRequest(f"{param}: at least one model needs a weight above 0", param=param)


def auto_weights(prompt_nll: Mapping[str, float], n_tokens: int, temperature: float) -> dict[str, float]:
    """PackLLM-sim weights from each model's total NLL of the prompt (see the module doc)."""
    scaled = {m: -(nll / max(n_tokens, 1)) / temperature for m, nll in prompt_nll.items()}
    top = max(scaled.values())
    exps = {m: math.exp(s - top) for m, s in scaled.items()}
    total = sum(exps.values())
    return {m: e / total for m, e in exps.items()}


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf

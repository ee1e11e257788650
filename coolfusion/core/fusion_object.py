"""A request's `fusion` object (our extension of the OpenAI bodies): its keys, declared once.

`FusionOptions` is the one declaration of the keys and their types. The server's request
models parse `fusion` into it (coolfusion/server/schemas.py), the eval tool's column settings
are checked against it (coolfusion/evaluation/columns.py), and docs/api.md ("The fusion
object") has one table row per key, which a test compares with `KEYS`. An unknown key is a
mistake to report, not a newer feature to ignore (the object is ours): `check_keys` refuses
it with a 400 naming `fusion.<key>` and listing the keys. The values of the selection keys
are checked by the engine (coolfusion.core.selection.check), with the same `param`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Mapping

from coolfusion.core.errors import InvalidRequest
from coolfusion.core.selection import SelectionRequest

UNKNOWN_KEY = "unknown_parameter"  # the error code of an unknown key


@dataclass(frozen=True)
class FusionOptions:
    """Every key of the `fusion` object. The selection keys override the config's `fusion`
    section for this request (coolfusion/core/selection.py); None: the config's value."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the server's request models: no other key
    trace: bool = False  # every step's candidates and perplexities in the response
    judge: bool = False  # every source model scores the whole answer (`fusion_judge`)
    select: str | None = None  # one of selection.RULES (checked by selection.check)
    weights: Mapping[str, float] | str | None = None  # {model: w} or "auto"; with select: weighted
    end_scoring: str | None = None  # one of selection.END_SCORING
    score_end: Mapping[str, bool] | None = None  # {model: false}: its end predictions do not count
    speculative: bool | None = None  # draft-and-check proposals (greedy fused ids); None: config fusion.speculative

    def selection(self) -> SelectionRequest:
        return SelectionRequest(self.select, self.weights, self.end_scoring, self.score_end)


KEYS: tuple[str, ...] = tuple(f.name for f in fields(FusionOptions))


def check_keys(fusion: Mapping[str, object]) -> None:
    """Raise InvalidRequest (a 400 naming `fusion.<key>`) for the first key of a `fusion`
    object that is not one of KEYS."""
    for key in fusion:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidRequest(f"fusion.{key}: {key!r} is not a key of the fusion object{hint}; "
                                 f"its keys are: {', '.join(KEYS)}", param=f"fusion.{key}", code=UNKNOWN_KEY)

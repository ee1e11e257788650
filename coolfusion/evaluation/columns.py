"""Table columns: a model id, optionally with fusion settings (`coolfusion eval --models`).

A column is written `MODEL` or `MODEL:SETTINGS`, where SETTINGS is one of

    geo_mean_ppl                          a selection rule alone (fusion.select)
    select=weighted+weights=auto          key=value pairs joined by '+' (the values are
                                          strings: select, weights=auto, end_scoring)
    {"select": "weighted", "weights": {"smollm2-135m": 2}}   a JSON object

and every request of that column sends the settings as its `fusion` object (docs/api.md,
"The fusion object"). A key that is not one of the fusion object's
(coolfusion.core.fusion_object.KEYS) is refused here, before anything is sent, as the server
would refuse it. The label, exactly as given, names the column in the table and in the
results file (`model`); the model id and the settings are stored beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from coolfusion.core import fusion_object
from coolfusion.core.errors import InvalidRequest
from coolfusion.core.selection import RULES
from coolfusion.core.types import VARIANTS

from coolfusion.evaluation.tasks import TaskError


@dataclass(frozen=True)
class Column:
    label: str
    model: str
    fusion: dict = field(default_factory=dict)

    @property
    def is_source(self) -> bool:
        """A source model alone (the baselines the fused columns are compared with)."""
        return self.model not in VARIANTS and not self.fusion


def parse_column(label: str) -> Column:
    """Split a column label at the first ':' whose rest reads as settings."""
    for i, ch in enumerate(label):
        if ch == ":":
            settings = _settings(label[i + 1 :])
            if settings is not None:
                return Column(label, label[:i], settings)
    return Column(label, label)


def _settings(text: str) -> dict | None:
    """The fusion object that `text` writes, or None where it is no settings (part of the id)."""
    if text in RULES:
        return {"select": text}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskError(f"column settings {text!r} are not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise TaskError(f"column settings {text!r} must be a JSON object")
    else:
        pairs = [p.split("=", 1) for p in text.split("+")]
        if not all(len(p) == 2 for p in pairs):
            return None
        value = dict(pairs)
    try:
        fusion_object.check_keys(value)
    except InvalidRequest as err:
        raise TaskError(f"column settings {text!r}: {err.message}") from None
    return value


def split_columns(text: str) -> list[str]:
    """`--models` split at commas outside JSON braces, duplicates dropped."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return list(dict.fromkeys(s for s in out if s))

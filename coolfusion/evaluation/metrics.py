"""Answer extraction and scoring: pure functions, no I/O.

- `last_number` / `gsm8k_correct`: GSM8K and MGSM accuracy, the last number in the output
  (commas stripped, compared as decimals, so "18.00" matches "18").
- `first_word` / `lambada_correct`: LAMBADA, the first word of the output
  (`^\\s*([\\w'’-]+)`) must equal the target, case-sensitive.
- `squad_em` / `squad_f1`: SQuAD exact match and token F1 after the official
  normalisation (lower case, drop punctuation, drop the articles a/an/the, collapse
  whitespace), each the maximum over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FIRST_WORD = re.compile(r"^\s*([\w'’-]+)")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def last_number(text: str) -> str | None:
    """The last number in `text`, commas removed ("1,234.5" -> "1234.5"); None if none.

    A minus sign counts only when it does not follow a digit or letter, so the last number
    of "16-3-4=9" is "9" and of "10-4" is "4", while "it is -5" gives "-5".
    """
    found = None
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if s.startswith("-") and m.start() > 0 and text[m.start() - 1].isalnum():
            s = s[1:]
        found = s
    if found is None:
        return None
    found = found.replace(",", "")
    return found or None


def _as_decimal(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", "").strip())
    except (InvalidOperation, AttributeError):
        return None


def gsm8k_correct(output: str, target: str) -> bool:
    """True when the last number of `output` equals `target` numerically."""
    got = last_number(output)
    if got is None:
        return False
    a, b = _as_decimal(got), _as_decimal(target)
    return a is not None and b is not None and a == b


def first_word(text: str) -> str | None:
    m = _FIRST_WORD.match(text)
    return m.group(1) if m else None


def lambada_correct(output: str, target: str) -> bool:
    return first_word(output) == target


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation (squad v1.1/v2.0 evaluate script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _em(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:  # official script: F1 is 1 when both are empty, else 0
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(pred: str, golds: list[str]) -> float:
    return max((_em(pred, g) for g in golds), default=0.0)


def squad_f1(pred: str, golds: list[str]) -> float:
    return max((_f1(pred, g) for g in golds), default=0.0)


def contains_answer(output: str, golds: list[str]) -> bool:
    """A gold answer appears in the output as whole words, after SQuAD's normalisation."""
    text = f" {normalize_answer(output)} "
    return any(f" {normalize_answer(g)} " in text for g in golds if normalize_answer(g))

"""Answer extraction and metrics of the evaluation tasks (coolfusion/evaluation/metrics.py)."""

import pytest

from coolfusion.evaluation import metrics


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.", "18"),
    ("The answer is 18 dollars, not 17", "17"),          # the last number, not the first
    ("He paid $1,234,567 in total", "1234567"),          # thousands separators stripped
    ("It costs 3.5.", "3.5"),                            # a sentence's full stop is not a decimal
    ("16-3-4=9", "9"),
    ("10-4", "4"),                                       # a minus after a digit is subtraction
    ("The temperature fell to -5", "-5"),
    ("#### 72\n\nQuestion: Tom has 5 apples", "5"),
    ("no digits here", None),
    ("", None),
])
def test_gsm8k_answer_is_the_last_number_without_commas(text, expected):
    assert metrics.last_number(text) == expected


@pytest.mark.parametrize("output, target, correct", [
    (" She makes $18.00 every day.", "18", True),        # compared as numbers
    (" 1,000 + 200 = 1,200\n#### 1,200", "1200", True),
    (" The answer is 18. Then 19 more", "18", False),    # last number is 19
    (" The answer is eighteen", "18", False),
    (" -3 degrees", "-3", True),
    (" 3 degrees", "-3", False),
])
def test_gsm8k_correct_compares_the_last_number_numerically(output, target, correct):
    assert metrics.gsm8k_correct(output, target) is correct


@pytest.mark.parametrize("output, target, correct", [
    (" signs. And then", "signs", True),
    ("signs", "signs", True),
    ("\n signs", "signs", True),
    (" Signs", "signs", False),                          # case-sensitive
    (" sign", "signs", False),
    (" don't know", "don't", True),                      # apostrophes belong to the word
    (" well-known fact", "well-known", True),            # so do hyphens
    (" ’em all", "’em", True),
    ("", "signs", False),
    (" , signs", "signs", False),                        # punctuation first: no word at the start
])
def test_lambada_first_word_must_equal_the_target(output, target, correct):
    assert metrics.lambada_correct(output, target) is correct


def test_squad_normalisation_is_the_official_one():
    assert metrics.normalize_answer("The  Norman-conquest, of England!") == "normanconquest of england"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    assert metrics.normalize_answer("Anne and Theodore") == "anne and theodore"  # only whole articles go


def test_squad_exact_match_after_normalisation_and_max_over_golds():
    assert metrics.squad_em("the France.", ["France"]) == 1.0
    assert metrics.squad_em("France and Italy", ["France"]) == 0.0
    assert metrics.squad_em("10th century", ["in the 10th century", "10th century"]) == 1.0
    assert metrics.squad_em("", ["France"]) == 0.0


def test_squad_f1_is_token_overlap_and_max_over_golds():
    # pred tokens: norman conquest of england; gold: norman conquest -> P = 1/2, R = 1, F1 = 2/3
    assert metrics.squad_f1("Norman conquest of England", ["the Norman conquest"]) == pytest.approx(2 / 3)
    # gold 1: P = 1/2, R = 1 -> 2/3; gold 2: P = 1/2, R = 1/2 -> 1/2; the max is taken
    assert metrics.squad_f1("in 911", ["911", "the year 911"]) == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence (multiset overlap)
    assert metrics.squad_f1("Paris Paris", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert metrics.squad_f1("London", ["Paris"]) == 0.0
    assert metrics.squad_f1("", ["Paris"]) == 0.0

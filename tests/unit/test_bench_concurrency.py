"""`coolfusion bench --concurrency` on scripted models: the figures follow their
definitions and outputs under load are compared with solo outputs (fast tier)."""

from __future__ import annotations

import pytest
from fakes import scripted_engine as engine

from coolfusion.bench import concurrency


def test_levels_report_aggregate_rate_speedup_and_identity_with_solo_runs():
    eng = engine(" one two three four five", " one two six seven eight")
    res = concurrency.measure(eng, [1, 2, 3], max_tokens=12, models=["cool-fusion", "m1"], prompts=["Say:"])
    for model, rows in res["models"].items():
        assert [r["clients"] for r in rows] == [1, 2, 3]
        assert rows[0]["speedup"] == pytest.approx(1.0)
        for r in rows:
            assert r["identical"] is True
            assert r["chars_per_s"] == pytest.approx(r["chars"] / r["seconds"])
            assert r["speedup"] == pytest.approx(r["chars_per_s"] / rows[0]["chars_per_s"])
            assert r["latency_max_s"] >= r["latency_median_s"] > 0
    # every level served the same 3 requests (level 1 one after another), each with text
    for rows in res["models"].values():
        assert [r["requests"] for r in rows] == [3, 3, 3]
        assert rows[0]["chars"] == rows[1]["chars"] == rows[2]["chars"] > 0


def test_outputs_are_compared_with_a_reference_engines_solo_outputs_when_given():
    """`backend: ray` is checked against the local backend's solo outputs: a reference that
    differs makes every level non-identical and is reported."""
    eng = engine(" one two three four five", " one two six seven eight")
    own = concurrency.measure(eng, [1, 2], max_tokens=12, models=["m1"], prompts=["Say:"])
    same = concurrency.measure(eng, [1, 2], max_tokens=12, models=["m1"], prompts=["Say:"], reference=own["solo"])
    assert same["solo_equals_reference"] == {"m1": True} and all(r["identical"] for r in same["models"]["m1"])
    other = {"m1": {i: t + "!" for i, t in own["solo"]["m1"].items()}}
    diff = concurrency.measure(eng, [1, 2], max_tokens=12, models=["m1"], prompts=["Say:"], reference=other)
    assert diff["solo_equals_reference"] == {"m1": False} and not any(r["identical"] for r in diff["models"]["m1"])


def test_one_client_on_against_off_alternates_the_modes_and_compares_their_totals():
    on = engine(" one two three four five", " one two six seven eight")
    off = engine(" one two three four five", " one two six seven eight")
    solo = concurrency.measure(on, [1], max_tokens=12, models=["m1"], prompts=["Say:", "Go:"])["solo"]
    res = concurrency.one_client_on_off(on, off, ["m1"], 12, requests=1, solo=solo, repeat=3, prompts=["Say:", "Go:"])
    r = res["m1"]
    assert len(r["on_chars_per_s"]) == len(r["off_chars_per_s"]) == 3 and r["identical"] is True
    # the ratio is of the totals: between the slowest and fastest ratio of single runs
    assert min(r["on_chars_per_s"]) / max(r["off_chars_per_s"]) <= r["ratio"] <= max(r["on_chars_per_s"]) / min(r["off_chars_per_s"])
    wrong = {"m1": {0: solo["m1"][0] + "!"}}
    assert concurrency.one_client_on_off(on, off, ["m1"], 12, requests=1, solo=wrong, repeat=1,
                                        prompts=["Say:"])["m1"]["identical"] is False

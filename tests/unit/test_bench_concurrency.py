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
    # every client got text: the scripted models write the same words for every prompt
    assert res["models"]["m1"][2]["chars"] == 3 * res["models"]["m1"][0]["chars"]


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

"""The load test (coolfusion/bench/load_test.py) in its short form, against the real engine (issue 7).

8 clients on loopback, mixed completions / chat x stream / non-stream over two prompts, two
of them (a quarter) hanging up after their first streamed segment; max_tokens 8; the shipped
config (batching, its server.max_concurrent) and a queue big enough that nobody is refused. The references are the same requests run alone,
one after another, on the same server before the load.

RSS: the server runs in this process, so RSS covers the engine (about a gigabyte of weights
and runtime) plus the client threads; a leaked KV cache or a generation thread that never
ends would show as growth that does not come back. The figures go to stdout (pytest -s).
"""

from __future__ import annotations

import pytest

from coolfusion.bench import load_test

CLIENTS = 8
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def plan():
    return load_test.plan_clients(CLIENTS, load_test.PROMPTS[:2], disconnect_fraction=0.25)


@pytest.fixture(scope="module")
def report(engine, config, plan):
    rep = load_test.serve_and_load(engine, plan, max_tokens=MAX_TOKENS, max_concurrent=config.server.max_concurrent,
                                   request_timeout_s=300, idle_timeout_s=60)
    print("\n" + "\n".join(rep.lines()))
    return rep


def test_the_plan_mixes_endpoints_modes_and_a_quarter_of_hang_ups(plan):
    kinds = {(c.endpoint, c.stream) for c in plan}
    assert kinds == {("completions", False), ("completions", True), ("chat", False), ("chat", True)}
    hang_ups = [c for c in plan if c.disconnect]
    assert len(hang_ups) == CLIENTS // 4 and all(c.stream for c in hang_ups)
    assert {c.endpoint for c in hang_ups} == {"completions", "chat"}


def test_every_finished_response_is_byte_identical_to_the_same_request_run_alone(report):
    assert report.ok == CLIENTS - CLIENTS // 4, report.failures()  # everyone who did not hang up finished
    assert report.mismatches == []
    assert report.post_check is not None and report.post_check.finished  # and the server still answers the same


def test_no_request_under_load_gets_a_5xx_an_in_band_error_or_a_429(report):
    assert report.server_errors == []
    assert report.n429 == 0  # max_queue >= clients: everyone is admitted or queued
    assert all(o.status == 200 for o in report.outcomes)


def test_clients_that_hang_up_mid_stream_stop_their_generations(report, engine):
    assert report.disconnects == CLIENTS // 4
    assert all(o.text and not o.done for o in report.outcomes if o.disconnected)  # really mid-stream
    assert report.cancelled >= 1  # at least one was still generating when its client left, and was stopped
    assert report.idle_after and engine.active_requests == 0  # nothing keeps running


def test_rss_returns_within_ten_percent_of_its_baseline_after_the_load(report):
    assert report.rss_baseline and report.rss_after
    assert report.rss_growth is not None and abs(report.rss_growth) <= 0.10, report.lines()[-1]

"""`backend: ray` (coolfusion/workers/ray_proxy.py, coolfusion/workers/ray_actor.py): the source models as Ray actors, on a local Ray
cluster on loopback (CPU) with the real embedded pair. The Ray tests are skipped when Ray is
not installed (`pip install '.[ray]'`); the config tests run either way.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import threading

import pytest

from coolfusion.config import Config, parse_config
from coolfusion.core.errors import ConfigError, NotReady
from coolfusion.core.types import GenerationRequest, Message

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install '.[ray]')")

REQUESTS = [
    GenerationRequest(prompt="The capital of France is", max_tokens=24, trace=True),
    GenerationRequest(prompt="def fibonacci(n):", max_tokens=20, trace=True),
    GenerationRequest(messages=(Message("user", "Name three primary colors."),), max_tokens=20, trace=True),
]


def as_ray(config: Config, **ray) -> dict:
    data = config.model_dump()
    data["backend"] = "ray"
    data["ray"] = {**data["ray"], **ray}
    return data


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("change, key", [
    ({"ray": {"adress": "auto"}}, "ray.adress"),
    ({"backend": "slurm"}, "backend"),
    ({"ray": {"num_gpus": -1}}, "ray.num_gpus"),
    ({"ray": {"models": {"llama-3": {"num_gpus": 1}}}}, "ray.models.llama-3"),
    ({"ray": {"models": {"smollm2-135m": {"gpus": 1}}}}, "ray.models.smollm2-135m.gpus"),
])
def test_ray_config_errors_name_the_key(config, change, key):
    data = {**config.model_dump(), **change}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(data)


def test_per_model_ray_resources_override_the_defaults(config):
    cfg = parse_config(as_ray(config, num_cpus=2, models={"gemma3-270m": {"num_gpus": 0.5}}))
    assert cfg.backend == "ray"
    assert (cfg.ray.resources("smollm2-135m").num_cpus, cfg.ray.resources("smollm2-135m").num_gpus) == (2, 0)
    assert (cfg.ray.resources("gemma3-270m").num_cpus, cfg.ray.resources("gemma3-270m").num_gpus) == (2, 0.5)


def test_backend_ray_without_ray_installed_fails_at_start_up_naming_the_key(config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^backend: 'ray' needs the Ray package.*pip install"):
        parse_config(as_ray(config))
    parse_config(config.model_dump())  # backend: local needs no Ray


def test_importing_the_engine_does_not_import_ray():
    code = "import sys, coolfusion.engine.engine, coolfusion.config, coolfusion.core.loop; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- on a local Ray cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_engine(config):
    """The engine with `backend: ray`: one actor per model on a fresh local cluster (loopback)."""
    import ray

    from coolfusion.engine.engine import Engine

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        engine = Engine.from_config(parse_config(as_ray(config, num_cpus=0.5)))
        yield engine
        engine.close()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def slow_ray_engine(config, ray_engine):
    """`fusion.fast_paths: false` under `backend: ray`, on the same local cluster."""
    from coolfusion.engine.engine import Engine

    data = as_ray(config, num_cpus=0.5)
    data["fusion"] = {**data["fusion"], "fast_paths": False}
    engine = Engine.from_config(parse_config(data))
    yield engine
    engine.close()


def comparable(steps):
    return [(s.text, s.winner, s.eos, s.finish_reason, s.completion_tokens, s.prompt_tokens,
             [(c.text, c.proposed_by, c.eos) for c in s.candidates]) for s in steps]


@needs_ray
@pytest.mark.parametrize("req", REQUESTS, ids=["france", "code", "chat"])
def test_ray_backend_gives_byte_identical_output_to_the_local_backend(engine, ray_engine, req):
    from coolfusion.workers.ray_proxy import RayWorker

    assert all(isinstance(w, RayWorker) for w in ray_engine.workers)
    local = list(engine.generate(req))
    remote = list(ray_engine.generate(req))
    assert "".join(s.text for s in remote).encode() == "".join(s.text for s in local).encode()
    assert comparable(remote) == comparable(local)  # same segments, winners and candidates
    for a, b in zip(remote, local):  # PPLs agree up to float summation order (1 vs 2 BLAS threads)
        for ca, cb in zip(a.candidates, b.candidates):
            assert ca.ppl.keys() == cb.ppl.keys()
            assert all(math.isclose(ca.ppl[k], cb.ppl[k], rel_tol=1e-4) for k in ca.ppl)
    assert all(w.open_requests() == 0 for w in ray_engine.workers)  # every state was closed


@needs_ray
def test_an_actors_sequence_logprobs_equal_the_local_models(engine, ray_engine):
    """logprobs / echo and `weights: auto` read exact log-probs through the worker seam: the
    actor's must be the local model's (up to BLAS summation order), top alternatives too."""
    for local, remote in zip(engine.workers, ray_engine.workers):
        ids = local.text.encode("The capital of France is Paris.", special=True)
        a, b = local.sequence_logprobs(ids, 2), remote.sequence_logprobs(ids, 2)
        assert len(a) == len(b) == len(ids) - 1
        for (va, top_a), (vb, top_b) in zip(a, b):
            assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-4)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]


@needs_ray
def test_fast_paths_off_under_ray_turns_them_off_in_the_actors(ray_engine, slow_ray_engine):
    """The option reaches the actors (it is given at construction): they report it, and they
    do the reference path's work: no lookahead or KV reuse, so every step re-feeds the whole
    sequence, many times the tokens of the fast path, for the same text."""
    assert [w.actor_info().fast for w in ray_engine.workers] == [True, True]
    assert [w.actor_info().fast for w in slow_ray_engine.workers] == [False, False]
    req = REQUESTS[0]
    fed = []
    texts = []
    for eng in (ray_engine, slow_ray_engine):
        before = [w.forward_tokens for w in eng.workers]
        texts.append("".join(s.text for s in eng.generate(req)))
        fed.append([w.forward_tokens - b for w, b in zip(eng.workers, before)])
    assert texts[0] == texts[1]
    assert all(slow > 3 * fast for fast, slow in zip(*fed)), fed


@needs_ray
@pytest.mark.parametrize("ray_restarts", [False, True], ids=["proxy-replaces", "ray-restarts"])
def test_killing_an_actor_mid_request_fails_it_with_503_and_the_next_request_succeeds(
        engine, ray_engine, ray_restarts):
    """ray.kill(no_restart=True) leaves the actor dead for good: the proxy starts a new one;
    with no_restart=False Ray restarts it (max_restarts). Either way the request in flight
    fails with NotReady (503) and the next request gives the right output."""
    import ray

    victim = ray_engine.workers[0]
    long = GenerationRequest(prompt="Tell me a long story about a dragon:", max_tokens=300)
    gen = ray_engine.generate(long)
    next(gen)  # the request is running on both actors
    killer = threading.Timer(0.3, ray.kill, (victim.actor,), {"no_restart": not ray_restarts})
    killer.start()
    with pytest.raises(NotReady, match=victim.name) as err:
        for _ in gen:
            pass
    killer.join()
    assert err.value.status == 503 and "retry" in err.value.message
    assert ray_engine.active_requests == 0

    req = REQUESTS[0]
    after = list(ray_engine.generate(req))  # waits for the restarted actor to load
    assert comparable(after) == comparable(engine.generate(req))
    assert all(w.unavailable is None for w in ray_engine.workers)
    assert all(w.open_requests() == 0 for w in ray_engine.workers)


@needs_ray
def test_fused_alternatives_walk_states_on_the_actors_and_equal_the_local_ones(engine, ray_engine):
    """`logprobs: 1` on a fused id walks one state per model on the actors (`rewind` crosses
    the actor seam) and reports the local engine's alternatives; every walk's state is closed."""
    from coolfusion.core.types import COOL
    from coolfusion.engine.alternatives import Alternatives

    ids = tuple(engine.workers[0].text.encode("The capital of France is Paris. One, two, three, four", special=True))
    req = GenerationRequest(prompt_ids=ids, model=COOL, max_tokens=0, echo=True, logprobs=1)
    got = []
    for eng in (engine, ray_engine):
        eng.alternatives = Alternatives()
        got.append([e for s in eng.generate(req) for e in s.logprobs])
    local, remote = got
    assert ray_engine.alternatives.paths["step"] > 0 and ray_engine.alternatives.most_walks > 1
    assert [e.top and e.top[0][0] for e in remote] == [e.top and e.top[0][0] for e in local]
    assert all(math.isclose(a.top[0][1], b.top[0][1], abs_tol=1e-4) for a, b in zip(remote[1:], local[1:]))
    assert all(w.open_requests() == 0 for w in ray_engine.workers)


@needs_ray
def test_speculative_proposals_on_ray_give_the_local_plain_text(engine, ray_engine):
    """The check of a draft crosses the actor seam (`check_draft`): the text is the plain one."""
    from dataclasses import replace

    req = REQUESTS[1]
    local = list(engine.generate(replace(req, speculative=False, trace=True)))
    remote = list(ray_engine.generate(replace(req, speculative=True, trace=True)))
    assert "".join(s.text for s in remote).encode() == "".join(s.text for s in local).encode()
    assert [s.winner for s in remote] == [s.winner for s in local]
    assert sum(sum(s.speculation["accepted"].values()) for s in remote) > 0


def test_concurrent_requests_meet_in_each_actors_batched_runner_and_equal_local(engine, ray_engine):
    """The actors are threaded (one call per KV slot at once): four concurrent requests on
    `backend: ray` run in the same batched forwards of each actor's runner, and every output
    is the local backend's."""
    from coolfusion.bench import concurrency
    from coolfusion.workers.ray_actor import actor_concurrency

    assert actor_concurrency(ray_engine.fusion) >= ray_engine.fusion.kv_slots
    prompts = ["The capital of France is", "def fibonacci(n):", "Three primary colors are", "Once upon a time"]
    local = concurrency.solo_texts(engine, "cool-fusion", 12, 4, prompts)
    before = [w.runner_stats()["forwards"] for w in ray_engine.workers]
    row = concurrency.level(ray_engine, "cool-fusion", 4, 12, local, prompts)  # 4 clients at once
    assert row["identical"]
    stats = [w.runner_stats() for w in ray_engine.workers]
    sizes = [st["batch_sizes"][-(st["forwards"] - n):] for st, n in zip(stats, before)]  # this test's forwards
    assert all(max(s) > 1 for s in sizes), sizes  # requests met in one forward, on every actor
    assert all(w.open_requests() == 0 for w in ray_engine.workers)

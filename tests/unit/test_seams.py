"""The typed seams (docs/architecture.md): the HTTP layer's EngineClient protocol is what both
the engine and the tests' fake engine implement, member by member with the same parameters;
the worker contract and its benchmark probes are apart; both runners implement the Runner
protocol that the local worker takes."""

from __future__ import annotations

import inspect
import re
import typing

import pytest

from coolfusion.engine.client import EngineClient
from coolfusion.engine.engine import Engine
from coolfusion.runtime.batched_runner import BatchedRunner
from coolfusion.runtime.model_runner import ModelRunner
from coolfusion.runtime.runner import Runner
from coolfusion.workers.local import LocalWorker
from coolfusion.workers.protocol import Worker, WorkerProbes
from coolfusion.workers.ray_proxy import RayWorker
from tests.fakes import FakeEngine


def members(protocol) -> set[str]:
    """Methods, properties and data members a protocol declares."""
    return {n for n in (*vars(protocol), *getattr(protocol, "__annotations__", {})) if not n.startswith("_")}


def offers(impl, name: str) -> bool:
    """The class has the member, or its __init__ sets it."""
    return hasattr(impl, name) or re.search(rf"self\.{name}\b.*=", inspect.getsource(impl.__init__)) is not None


def params(obj, name) -> list[str]:
    attr = inspect.getattr_static(obj, name, None)
    if isinstance(attr, property) or not callable(attr):
        return []
    return [p for p in inspect.signature(attr).parameters if p != "self"]


@pytest.mark.parametrize("impl", [Engine, FakeEngine], ids=lambda c: c.__name__)
def test_the_engine_and_the_fake_implement_the_http_layers_protocol(impl):
    instance_attrs = set(vars(FakeEngine())) if impl is FakeEngine else set()  # set in __init__
    for name in members(EngineClient):
        assert hasattr(impl, name) or name in instance_attrs, name
        if hasattr(impl, name):
            assert params(impl, name) == params(EngineClient, name), name


def test_an_object_without_the_protocol_is_refused_by_the_app():
    from coolfusion.config import ServerConfig
    from coolfusion.server.state import AppState

    with pytest.raises(TypeError, match="EngineClient"):
        AppState(ServerConfig(), engine=object())


@pytest.mark.parametrize("impl", [LocalWorker, RayWorker], ids=lambda c: c.__name__)
def test_both_workers_offer_the_contract_and_the_probes(impl):
    for protocol in (Worker, WorkerProbes):
        for name in members(protocol):
            assert offers(impl, name), (protocol.__name__, name)


def test_the_probes_are_not_part_of_the_production_contract():
    assert not members(Worker) & {"forward_tokens", "tok_seconds", "cached_logits", "fresh_logits"}


@pytest.mark.parametrize("impl", [ModelRunner, BatchedRunner], ids=lambda c: c.__name__)
def test_both_runners_implement_the_runner_protocol(impl):
    for name in members(Runner):
        assert offers(impl, name), name
        assert params(impl, name) == params(Runner, name), name

"""Shared fixtures: the real embedded pair, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.yaml"


RAY_SERVER = pytest.StashKey()  # tests/ray_serve.py's server, started early (below)


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_finish(session):
    """When tests/test_ray_lifetime.py is among the tests to run, start its server now: its
    start and the 90 s its first test waits after /health first answers 200 then pass while
    the other tests run, instead of as an idle wait of their own."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or session.config.option.collectonly:
        return
    if any(item.path.name == "test_ray_lifetime.py" for item in session.items):
        import ray_serve

        session.config.stash[RAY_SERVER] = ray_serve.start()


def pytest_sessionfinish(session):
    server = session.config.stash.get(RAY_SERVER, None)
    if server is not None:  # its module never ran (deselected by -x, interrupted)
        server.stop()


@pytest.fixture(scope="session")
def config():
    from coolfusion.config import load_config

    return load_config(CONFIG)


@pytest.fixture(scope="session")
def engine(config):
    """The real engine on the two embedded models (SmolLM2-135M-Instruct + Gemma 3 270M)."""
    from coolfusion.engine.engine import Engine

    return Engine.from_config(config)


@pytest.fixture(scope="session")
def tokenizers():
    """The two real tokenizers without the models (cheap once cached). On a machine without
    the model packages (the GPU box), COOLFUSION_TEST_TOKENIZERS=dir1,dir2 names saved copies."""
    from transformers import AutoTokenizer

    saved = os.environ.get("COOLFUSION_TEST_TOKENIZERS")
    if saved:
        return [AutoTokenizer.from_pretrained(d) for d in saved.split(",")]
    from coolfusion.config import load_config
    from coolfusion.runtime.loading import load_tokenizer, resolve_source

    return [load_tokenizer(resolve_source(m)) for m in load_config(CONFIG).models]

"""Shared fixtures: the real embedded pair, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.yaml"


class EarlyRayServer:
    """The server of tests/test_ray_lifetime.py (tests/ray_serve.py), started before its
    module runs: its start and the 90 s its first test waits after /health first answers 200
    then pass while the other tests run, instead of as an idle wait of their own. It starts
    once the first real engine has loaded (the `engine` fixture), so that it reads the model
    caches that load built instead of converting the models a second time beside it."""

    def __init__(self):
        self.wanted = False  # set when test_ray_lifetime.py is among the tests to run
        self.server = None

    def start_if_wanted(self) -> None:
        if self.wanted and self.server is None:
            import ray_serve

            self.server = ray_serve.start()

    def take(self):
        """The early server, or a new one (the module run alone); from now on none starts early."""
        import ray_serve

        server, self.server, self.wanted = self.server or ray_serve.start(), None, False
        return server

    def stop(self) -> None:
        if self.server is not None:  # its module never ran (deselected by -x, interrupted)
            self.server.stop()
            self.server = None


RAY_SERVER = pytest.StashKey[EarlyRayServer]()


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config.stash[RAY_SERVER] = EarlyRayServer()


def pytest_collection_finish(session):
    import importlib.util

    if importlib.util.find_spec("ray") is None or session.config.option.collectonly:
        return
    if any(item.path.name == "test_ray_lifetime.py" for item in session.items):
        session.config.stash[RAY_SERVER].wanted = True


def pytest_sessionfinish(session):
    session.config.stash[RAY_SERVER].stop()


@pytest.fixture(scope="session")
def config():
    from coolfusion.config import load_config

    return load_config(CONFIG)


@pytest.fixture(scope="session")
def engine(config, request):
    """The real engine on the two embedded models (SmolLM2-135M-Instruct + Gemma 3 270M)."""
    from coolfusion.engine.engine import Engine

    engine = Engine.from_config(config)
    request.config.stash[RAY_SERVER].start_if_wanted()  # the caches are built now
    return engine


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

"""The scripts in scripts/ are run by hand, so nothing else notices when a module they reach
into is renamed: import each one and hook what it hooks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_each_script_imports(name):
    assert callable(_load(name).main)


def test_the_profile_records_the_schedulers_forwards(monkeypatch):
    from coolfusion.runtime.batch_scheduler import BatchScheduler

    profile = _load("profile_batching")
    monkeypatch.setattr(BatchScheduler, "_run", BatchScheduler._run)  # restored afterwards
    original = BatchScheduler._run
    profile._record_forwards()
    assert BatchScheduler._run is not original

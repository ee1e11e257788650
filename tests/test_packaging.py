"""What `pip install coolfusion` puts into site-packages: the wheel is built from a copy of the
source (offline, with the setuptools of this environment) and installed into an empty folder,
whose top level holds only the `coolfusion` package, its dist-info and the `coolfusion`
command; every file of the package, its data included (the chat page, the evaluation prompts
and data sets), is in it, and the installed copy finds its data. About 10-20 s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DATA_DIRS = ("server/static", "evaluation/prompts", "evaluation/data")


def _pip(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "coolfusion", src / "coolfusion", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (found,) = (tmp / "dist").glob("*.whl")
    return found


def _package_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "coolfusion").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_the_wheel_holds_only_the_coolfusion_package_and_every_file_of_it(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"coolfusion-{PROJECT['version']}.dist-info"
    assert {n.split("/")[0] for n in names} == {"coolfusion", dist_info}
    missing = sorted(_package_files() - names)
    assert missing == []
    for d in DATA_DIRS:  # the package data, named: a listing that lost them fails here too
        assert any(n.startswith(f"coolfusion/{d}/") for n in names), d


def test_the_wheels_requirements_keep_eval_and_test_packages_in_extras(wheel):
    meta = zipfile.ZipFile(wheel).read(f"coolfusion-{PROJECT['version']}.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert len(base) == len(PROJECT["dependencies"])
    assert not [r for r in base if r.startswith(("matplotlib", "openai", "pytest", "httpx", "ray"))]
    assert any(r.startswith("matplotlib") and 'extra == "eval"' in r for r in requires)


def test_installing_the_wheel_puts_only_coolfusion_at_the_top_level(wheel, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    top = {p.name for p in target.iterdir()}
    assert top == {"coolfusion", f"coolfusion-{PROJECT['version']}.dist-info", "bin"}
    assert (target / "bin" / "coolfusion").is_file()
    probe = ("import coolfusion, importlib.resources as r; print(coolfusion.__file__); "
             "print(all((r.files('coolfusion.' + d.split('/')[0]) / d.split('/')[1]).is_dir() for d in %r))" % (DATA_DIRS,))
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr
    where, data_found = r.stdout.split()
    assert Path(where).is_relative_to(target) and data_found == "True"

"""Dependencies earned (pyproject.toml): every dependency of a server install is used by the
serving code, the serving code imports nothing it does not declare, what only `coolfusion eval`
or the load test needs sits in an extra, and a missing extra stops with the pip command that
installs it. Read from the source with `ast` (the layout test's reader), fast tier."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from test_layout import RAY_MODULES, _files, external  # RAY_MODULES: the `ray` extra

from coolfusion.config import load_config
from coolfusion.extras import MissingExtra, install_command, require

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRA_OF = {"coolfusion.evaluation": "eval", "coolfusion.bench": "bench"}
IMPORT_NAME = {"pyyaml": "yaml"}  # distribution -> module, where the names differ
# modules a declared dependency brings and the serving code imports by name
BROUGHT_BY = {"starlette": "fastapi", "anyio": "fastapi", "pydantic_core": "pydantic"}
# dependencies the serving code needs without importing them by name
INDIRECT = {"gguf": "transformers reads GGUF files with it",
            "accelerate": "transformers requires it to load a GGUF"}


def _module_name(requirement: str) -> str:
    dist = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()
    return IMPORT_NAME.get(dist, dist.replace("-", "_"))


def _declared(extra: str | None = None) -> set[str]:
    reqs = PYPROJECT["dependencies"] if extra is None else PYPROJECT["optional-dependencies"][extra]
    return {_module_name(r) for r in reqs if not r.startswith("coolfusion")}


def _serving_modules() -> list[str]:
    return [m for m in _files() if not m.startswith(tuple(EXTRA_OF)) and m not in RAY_MODULES]


def _third_party(modules: list[str]) -> dict[str, set[str]]:
    """module -> the non-standard-library packages it imports."""
    return {m: {n for n in external(m) if n not in sys.stdlib_module_names} for m in modules}


def test_every_dependency_of_a_server_install_is_used_by_the_serving_code():
    imported = set().union(*_third_party(_serving_modules()).values())
    packages = {m.package for m in load_config(ROOT / "config.yaml").models}
    unused = [d for d in _declared() if d not in imported | packages | set(INDIRECT)]
    assert unused == []
    assert "matplotlib" not in _declared() and "httpx" not in _declared()


def test_the_serving_code_imports_only_what_a_server_install_declares():
    allowed = _declared() | set(BROUGHT_BY)
    undeclared = {m: names - allowed for m, names in _third_party(_serving_modules()).items() if names - allowed}
    assert undeclared == {}


def test_eval_and_bench_import_only_the_server_install_and_their_own_extra():
    for prefix, extra in EXTRA_OF.items():
        allowed = _declared() | _declared(extra) | set(BROUGHT_BY)
        mods = [m for m in _files() if m.startswith(prefix)]
        undeclared = {m: names - allowed for m, names in _third_party(mods).items() if names - allowed}
        assert undeclared == {}, extra


def test_every_require_names_the_extra_that_installs_the_module():
    calls = []
    for mod, path in _files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                module, extra = (a.value for a in node.args)
                calls.append((mod, module, extra))
                assert module.split(".")[0] in _declared(extra), (mod, module, extra)
    assert {extra for _, _, extra in calls} == {"eval", "bench"}


def test_the_test_extra_pulls_every_other_extra():
    extras = set(PYPROJECT["optional-dependencies"]) - {"test"}
    pulled = next(r for r in PYPROJECT["optional-dependencies"]["test"] if r.startswith("coolfusion["))
    assert set(pulled[len("coolfusion["):-1].split(",")) == extras
    assert '".[test]"' in (ROOT / "scripts" / "test.sh").read_text()


def test_a_missing_module_of_an_extra_stops_with_the_pip_command_of_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtra, match=re.escape(install_command("eval"))):
        require("matplotlib", "eval")
    assert install_command("eval") == 'pip install "coolfusion[eval]"'


def test_coolfusion_eval_without_the_eval_extra_names_the_extra(monkeypatch, capsys):
    from coolfusion.server.cli import main

    monkeypatch.setitem(sys.modules, "openai", None)
    monkeypatch.delitem(sys.modules, "coolfusion.evaluation.cli", raising=False)
    assert main(["eval", "--task", "chat_facts"]) == 1
    err = capsys.readouterr().err
    assert "'openai' package is not installed" in err and 'pip install "coolfusion[eval]"' in err

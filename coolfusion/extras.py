"""The distribution's optional extras (pyproject.toml, [project.optional-dependencies]).

A server install pulls only what serving needs; `coolfusion eval` (the `eval` extra), the load
test (`bench`) and the Ray backend (`ray`) need more. The code that needs an extra imports it
with `require`, which stops with the pip command that installs the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_command(extra: str) -> str:
    return f'pip install "coolfusion[{extra}]"'


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, which the `extra` extra installs; raise MissingExtra naming it when absent."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"the {module.split('.')[0]!r} package is not installed; it comes with "
                           f"the {extra} extra: {install_command(extra)}") from err

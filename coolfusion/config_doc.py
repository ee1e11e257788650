"""docs/configuration.md, generated from the config schema (coolfusion.config): every key
with its type, default and description, section by section.

    python -m coolfusion.config_doc > docs/configuration.md

The schema is walked, not listed: a key added to a config model appears here with the
description its `Field` carries. A test (tests/unit/test_config_doc.py) fails when the file in
docs/ differs from what this prints.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from typing import Any, Iterator, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from coolfusion.config import Config

COMMAND = "python -m coolfusion.config_doc > docs/configuration.md"

INTRO = f"""# Configuration

`coolfusion serve --config config.yaml` reads one YAML file. It is strict: an unknown key or a
bad value stops the start with a message that names the key (`models.1.device: ...`). A key
left out takes the default below; config.yaml sets only what differs or what a reader should
see. The `server` keys can also be given as `coolfusion serve` flags (`coolfusion serve --help`).

This file is generated from the schema (coolfusion/config.py) by `{COMMAND}`;
a test fails when it drifts from the schema. Do not edit it by hand.
"""

CONSTRAINTS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "at least"),
               ("max_length", "at most"))
SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}


def sections(model: type[BaseModel] = Config, path: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted path, model) for `model` and every section nested in it, depth first;
    a list or a mapping of sections is named `path` (`models`, `ray.models`)."""
    yield path, model
    for key, field in model.model_fields.items():
        nested = _section_model(field.annotation)
        if nested is not None:
            yield from sections(nested, f"{path}.{key}" if path else key)


def markdown() -> str:
    """The whole document."""
    parts = [INTRO]
    for path, model in sections():
        parts.append(_section(path, model))
    return "\n".join(parts)


def _section(path: str, model: type[BaseModel]) -> str:
    title = path or "Top level"
    doc = inspect.cleandoc(model.__doc__ or "")
    lines = [f"## {title}", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        key_path = f"{path}.{key}" if path else key
        cells = (f"`{key}`", describe_type(field, key_path), describe_default(field), field.description or "")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def describe_type(field: FieldInfo, path: str) -> str:
    """The type of the field at `path` in words, with its bounds (`integer, > 0`); a section
    links to its own table."""
    words = _type_words(field.annotation, path)
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata for attr, sym in CONSTRAINTS
              if getattr(m, attr, None) is not None]
    pattern = next((m.pattern for m in field.metadata if getattr(m, "pattern", None)), None)
    if pattern:
        bounds.append(f"matching `{pattern}`")
    return ", ".join([words, *bounds])


def describe_default(field: FieldInfo) -> str:
    """The default as the table shows it: a value in code style, else words."""
    text = default_text(field)
    return f"`{text}`" if _is_value(field.default) else text


def default_text(field: FieldInfo) -> str:
    """The default in plain text (as `coolfusion serve --help` shows it too)."""
    value = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _is_value(default: Any) -> bool:
    return default is not PydanticUndefined and default is not None and not isinstance(default, BaseModel)


def _type_words(annotation: Any, path: str) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_words(a, path) for a in args if a is not type(None))
    if origin in (tuple, list):
        return f"list of {_type_words(args[0], path)}"
    if origin is dict:
        return f"mapping of {_type_words(args[0], path)} to {_type_words(args[1], path)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"section [{path}](#{_anchor(path)})"
    if annotation in SCALARS:
        return SCALARS[annotation]
    raise TypeError(f"config_doc: no words for the type {annotation!r}; add it to _type_words")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds: itself, or the items of its list or mapping."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (tuple, list, dict):
        return next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return None


def _anchor(path: str) -> str:
    """The id GitHub gives the heading `## path`."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    sys.stdout.write(markdown())

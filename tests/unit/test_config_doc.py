"""The config schema is the one source of defaults (coolfusion/config.py): every key carries a
description, docs/configuration.md is what the generator prints from the schema, the
generator walks the schema (a new key or section appears by itself), and the selection
defaults come from coolfusion/core/selection.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from coolfusion import config_doc
from coolfusion.config import FusionConfig
from coolfusion.core import selection

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def test_docs_configuration_md_is_what_the_schema_generates():
    assert DOC.read_text(encoding="utf-8") == config_doc.markdown(), (
        f"docs/configuration.md drifted from the schema; regenerate it: {config_doc.COMMAND}")


def test_every_config_key_has_a_description():
    missing = [f"{path}.{key}".lstrip(".") for path, model in config_doc.sections()
               for key, field in model.model_fields.items() if not (field.description or "").strip()]
    assert missing == []


def test_the_doc_has_a_table_row_for_every_key_of_every_section():
    doc = DOC.read_text(encoding="utf-8")
    for path, model in config_doc.sections():
        title = path or "Top level"
        body = doc.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        rows = re.findall(r"^\| `([a-z_]+)` \|", body, flags=re.M)
        assert rows == list(model.model_fields), title
    assert {"fusion", "server", "ray", "models", "ray.models"} <= {p for p, _ in config_doc.sections()}


class _Inner(BaseModel):
    """An inner section."""

    depth: int = Field(3, ge=1, description="how deep")


class _Toy(BaseModel):
    """A toy file."""

    mode: Literal["a", "b"] = Field("a", description="the mode")
    limit_s: float | None = Field(None, gt=0, description="a time limit")
    inner: _Inner = Field(_Inner(), description="nested")
    many: tuple[_Inner, ...] = Field((), description="a list of sections")


def test_the_generator_walks_any_schema_with_types_bounds_defaults_and_nested_sections():
    paths = [p for p, _ in config_doc.sections(_Toy)]
    assert paths == ["", "inner", "many"]
    top = config_doc._section("", _Toy)
    assert "| `mode` | one of `a`, `b` | `a` | the mode |" in top
    assert "| `limit_s` | number, > 0 | unset | a time limit |" in top
    assert "| `inner` | section [inner](#inner) | its keys' defaults | nested |" in top
    assert "| `many` | list of section [many](#many) | `[]` | a list of sections |" in top
    assert "| `depth` | integer, >= 1 | `3` | how deep |" in config_doc._section("inner", _Inner)


def test_the_section_links_in_the_doc_lead_to_headings():
    doc = DOC.read_text(encoding="utf-8")
    anchors = {config_doc._anchor(h) for h in re.findall(r"^## (.+)$", doc, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", doc)
    assert links and set(links) <= anchors


def test_the_selection_rules_and_defaults_are_those_of_core_selection():
    fusion = FusionConfig()
    assert (fusion.select, fusion.end_scoring, fusion.auto_temperature) == (
        selection.DEFAULT_RULE, selection.DEFAULT_END_SCORING, selection.DEFAULT_AUTO_TEMPERATURE)
    assert (selection.Selection().rule, selection.Selection().end_scoring) == (fusion.select, fusion.end_scoring)
    for rule in selection.RULES:
        assert FusionConfig(select=rule).select == rule
    doc = DOC.read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if line.startswith("| `select` |"))
    assert all(f"`{rule}`" in row for rule in selection.RULES)


def test_config_yaml_comments_point_to_the_doc_and_do_not_list_the_rules():
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    comments = " ".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    assert "docs/configuration.md" in comments
    names = [r for r in selection.RULES + selection.END_SCORING if "_" in r]  # not plain words
    assert names and not [r for r in names if r in comments]

"""Evaluation tasks: read a data file, build each prompt from a template file, score outputs.

A task is a data file plus a reader (file -> `Item`s), a prompt template and a scorer.
Prompts live in template files (`coolfusion/evaluation/prompts/<task>.yaml`, or any file given with
`--template`), never in code. A template file holds:

    mode: completion | chat       # /v1/completions, or /v1/chat/completions with one user message
    shots: 3                      # default few-shot count (`--shots` overrides)
    instruction: "..."            # text before the examples; "" for none
    example: "Question: {question}\\nAnswer: {answer}"   # one few-shot example
    query: "Question: {question}\\nAnswer:"              # the item itself
    separator: "\\n\\n"           # between instruction, examples and query
    max_tokens: 256               # generation budget (`--max-tokens` overrides)
    stop: ["Question:"]           # stop strings
    examples: [{...}, ...]        # optional worked examples with the fields the example uses;
                                  # without it the examples are the first `shots` items of
                                  # the data file, which are then left out of the evaluation

`{name}` placeholders are Python format fields filled from the item's fields (listed at the
top of each shipped template); write `{{`/`}}` for a literal brace.

Tasks: `gsm8k`, `lambada`, `squad`, `chat_facts`, `mgsm_<lang>` (en, zh, de, es, fr, ru). Data files come
from `--data-dir`, else `$COOLFUSION_DATA`, else the copies shipped in this package
(`coolfusion/evaluation/data/`, package data: a clone and an installed copy both have them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import yaml

from coolfusion.evaluation import metrics

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"  # public splits + licences (data/README.md)
MODES = ("completion", "chat")


class TaskError(ValueError):
    """A task, template or data file cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Item:
    id: str  # stable across runs: the task name and the line number (or the dataset's own id)
    fields: Mapping[str, str]  # filled into the template
    target: str | tuple[str, ...]  # gold answer (SQuAD: every gold answer)


@dataclass(frozen=True)
class Request:
    """What to send for one item: a completion prompt, or that prompt as one chat message."""

    mode: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...]

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    source: str  # the file it came from
    mode: str
    shots: int
    instruction: str
    example: str
    query: str
    separator: str
    max_tokens: int
    stop: tuple[str, ...]
    examples: tuple[Mapping[str, str], ...] | None  # None: take examples from the data file

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "shots": self.shots, "instruction": self.instruction,
            "example": self.example, "query": self.query, "separator": self.separator,
            "max_tokens": self.max_tokens, "stop": list(self.stop),
            "examples": None if self.examples is None else [dict(e) for e in self.examples],
        }


_TEMPLATE_KEYS = {"mode", "shots", "instruction", "example", "query", "separator",
                  "max_tokens", "stop", "examples"}


def load_template(path: str | Path) -> Template:
    """Read and check a template file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"template file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TaskError(f"template {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise TaskError(f"template {path} must hold a mapping")
    unknown = sorted(set(data) - _TEMPLATE_KEYS)
    if unknown:
        raise TaskError(f"template {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TEMPLATE_KEYS))})")
    if "query" not in data:
        raise TaskError(f"template {path}: missing key 'query'")

    def text(key: str, default: str = "") -> str:
        v = data.get(key, default)
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise TaskError(f"template {path}: {key} must be a string")
        return v

    def count(key: str, default: int, minimum: int) -> int:
        v = data.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise TaskError(f"template {path}: {key} must be an integer >= {minimum}")
        return v

    mode = data.get("mode", "completion")
    if mode not in MODES:
        raise TaskError(f"template {path}: mode must be one of {', '.join(MODES)}, not {mode!r}")
    stop = data.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TaskError(f"template {path}: stop must be a list of non-empty strings")
    examples = data.get("examples")
    if examples is not None:
        if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
            raise TaskError(f"template {path}: examples must be a list of mappings")
        examples = tuple({str(k): str(v) for k, v in e.items()} for e in examples)
    return Template(
        source=str(path), mode=mode, shots=count("shots", 0, 0),
        instruction=text("instruction"), example=text("example"), query=text("query"),
        separator=text("separator", "\n\n"), max_tokens=count("max_tokens", 64, 1),
        stop=tuple(stop), examples=examples,
    )


def _fill(template: str, fields: Mapping[str, str], where: str, source: str) -> str:
    try:
        return template.format_map(dict(fields))
    except KeyError as err:
        raise TaskError(f"template {source}: {where} uses field {{{err.args[0]}}}, "
                        f"but items have only {', '.join(sorted(fields))}") from None
    except (ValueError, IndexError) as err:
        raise TaskError(f"template {source}: {where} is not a valid format string: {err}") from None


# ---------------------------------------------------------------- data location


def data_dir_candidates() -> list[Path]:
    """Where the data folder is looked for, in order (without --data-dir)."""
    env = os.environ.get("COOLFUSION_DATA")
    if env:
        return [Path(env)]
    return [BUNDLED_DATA_DIR]


def default_data_dir() -> Path | None:
    """The first existing candidate of `data_dir_candidates()`, or None."""
    for p in data_dir_candidates():
        if p.is_dir():
            return p
    return None


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        p = Path(explicit)
        if not p.is_dir():
            raise TaskError(f"data directory not found: {p}")
        return p
    found = default_data_dir()
    if found is None:
        tried = ", ".join(str(p) for p in data_dir_candidates())
        raise TaskError(f"no data directory found (tried {tried}); pass --data-dir or set COOLFUSION_DATA")
    return found


# ---------------------------------------------------------------- readers


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskError(f"{path}:{n}: not valid JSON: {err}") from None
    return rows


_CALC = re.compile(r"<<[^<>]*>>")


def read_gsm8k(path: Path, name: str) -> list[Item]:
    items = []
    for i, row in enumerate(_jsonl(path)):
        answer = row["answer"]
        if "#### " not in answer:
            raise TaskError(f"{path}: line {i + 1}: answer has no '#### '")
        target = answer.rsplit("#### ", 1)[1].strip().replace(",", "")
        solution = _CALC.sub("", answer)
        items.append(Item(f"{name}/{i}", {"question": row["question"], "answer": solution,
                                          "target": target}, target))
    return items


def read_lambada(path: Path, name: str) -> list[Item]:
    items = []
    for i, row in enumerate(_jsonl(path)):
        context, _, target = row["text"].rstrip().rpartition(" ")
        items.append(Item(f"{name}/{i}", {"context": context, "target": target}, target))
    return items


def read_squad(path: Path, name: str) -> list[Item]:
    items = []
    for row in _jsonl(path):
        golds = tuple(row["answers"])
        if not golds:
            raise TaskError(f"{path}: item {row['id']} has no answers")
        items.append(Item(f"{name}/{row['id']}", {
            "context": row["context"], "question": row["question"],
            "title": row.get("title", ""), "answer": golds[0]}, golds))
    return items


def read_chat_facts(path: Path, name: str) -> list[Item]:
    return [Item(f"{name}/{i}", {"question": row["question"]}, tuple(row["answers"]))
            for i, row in enumerate(_jsonl(path))]


def read_mgsm(path: Path, name: str) -> list[Item]:
    items = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            question, sep, answer = line.rpartition("\t")
            if not sep:
                raise TaskError(f"{path}:{i + 1}: expected question<TAB>answer")
            answer = answer.strip().replace(",", "")
            items.append(Item(f"{name}/{i}", {"question": question, "answer": answer,
                                              "target": answer}, answer))
    return items


# ---------------------------------------------------------------- scorers


def score_number(output: str, target) -> dict[str, float]:
    return {"accuracy": float(metrics.gsm8k_correct(output, target))}


def score_lambada(output: str, target) -> dict[str, float]:
    return {"accuracy": float(metrics.lambada_correct(output, target))}


def score_squad(output: str, target) -> dict[str, float]:
    answer = output.strip().split("\n", 1)[0].strip()
    golds = list(target)
    return {"em": metrics.squad_em(answer, golds), "f1": metrics.squad_f1(answer, golds)}


def score_contains(output: str, target) -> dict[str, float]:
    return {"accuracy": float(metrics.contains_answer(output, list(target)))}


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data_file: str
    reader: Callable[[Path, str], list[Item]]
    scorer: Callable[[str, object], dict[str, float]]
    metrics: tuple[str, ...]  # the first is the headline metric (bar chart)
    template: str  # file name in coolfusion/evaluation/prompts


MGSM_LANGS = ("en", "zh", "de", "es", "fr", "ru")
_SPECS = {
    "gsm8k": TaskSpec("gsm8k", "gsm8k_test_public.jsonl", read_gsm8k, score_number, ("accuracy",), "gsm8k.yaml"),
    "lambada": TaskSpec("lambada", "lambada_test_public.jsonl", read_lambada, score_lambada, ("accuracy",), "lambada.yaml"),
    "squad": TaskSpec("squad", "squad_dev_public.jsonl", read_squad, score_squad, ("em", "f1"), "squad.yaml"),
    "chat_facts": TaskSpec("chat_facts", "chat_facts.jsonl", read_chat_facts, score_contains, ("accuracy",),
                           "chat_facts.yaml"),
    **{f"mgsm_{lang}": TaskSpec(f"mgsm_{lang}", f"mgsm_{lang}.tsv", read_mgsm, score_number, ("accuracy",), "mgsm.yaml")
       for lang in MGSM_LANGS},
}
TASK_NAMES = tuple(_SPECS)


class Task:
    """One task, ready to run: its evaluation items, prompts, requests and scorer."""

    def __init__(self, spec: TaskSpec, data_path: Path, template: Template, shots: int,
                 mode: str, max_tokens: int):
        self.spec = spec
        self.name = spec.name
        self.metrics = spec.metrics
        self.data_path = data_path
        self.template = template
        self.shots = shots
        self.mode = mode
        self.max_tokens = max_tokens
        rows = spec.reader(data_path, spec.name)
        if template.examples is not None:
            if shots > len(template.examples):
                raise TaskError(f"--shots {shots}: template {template.source} has only "
                                f"{len(template.examples)} worked example(s)")
            self.examples: tuple[Mapping[str, str], ...] = tuple(template.examples[:shots])
            self.items: tuple[Item, ...] = tuple(rows)
        else:
            if shots >= len(rows):
                raise TaskError(f"--shots {shots}: {data_path} has only {len(rows)} items")
            self.examples = tuple(r.fields for r in rows[:shots])
            self.items = tuple(rows[shots:])  # few-shot examples are never evaluated
        if self.items:  # fail now, not on the first request, when a field is unknown
            self.prompt(self.items[0])

    def select(self, limit: int | None = None) -> list[Item]:
        """The first `limit` evaluation items (all when None)."""
        return list(self.items if limit is None else self.items[:limit])

    def prompt(self, item: Item) -> str:
        t = self.template
        parts = [t.instruction] if t.instruction else []
        parts += [_fill(t.example, ex, "example", t.source) for ex in self.examples]
        parts.append(_fill(t.query, item.fields, "query", t.source))
        return t.separator.join(parts)

    def request(self, item: Item) -> Request:
        return Request(self.mode, self.prompt(item), self.max_tokens, self.template.stop)

    def score(self, output: str, item: Item) -> dict[str, float]:
        return self.spec.scorer(output, item.target)

    def settings(self) -> dict:
        """Everything that changes the requests; results from other settings don't mix."""
        return {"task": self.name, "data_file": self.data_path.name, "shots": self.shots,
                "mode": self.mode, "max_tokens": self.max_tokens,
                "template": self.template.as_dict(),
                "examples": [dict(e) for e in self.examples]}

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def load_task(name: str, *, data_dir: str | Path | None = None, template: str | Path | None = None,
              shots: int | None = None, mode: str | None = None, max_tokens: int | None = None) -> Task:
    """Build a task; None options take the template's defaults."""
    spec = _SPECS.get(name)
    if spec is None:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    tpl = load_template(template if template is not None else PROMPTS_DIR / spec.template)
    if shots is not None and shots < 0:
        raise TaskError("--shots must be >= 0")
    if mode is not None and mode not in MODES:
        raise TaskError(f"--mode must be one of {', '.join(MODES)}")
    if max_tokens is not None and max_tokens < 1:
        raise TaskError("--max-tokens must be >= 1")
    data_path = resolve_data_dir(data_dir) / spec.data_file
    if not data_path.is_file():
        raise TaskError(f"data file for task {name!r} not found: {data_path}")
    return Task(spec, data_path, tpl, tpl.shots if shots is None else shots,
                mode or tpl.mode, max_tokens or tpl.max_tokens)

"""Run a task against a running server's OpenAI API and keep every answer in a JSONL file.

`run_task(task, items, models, client, results_path, ...)` sends one request per
(model id, item) pair that the results file does not hold yet, `concurrency` at a time
(threads), with a tqdm progress bar, and appends one line per answer as soon as it arrives.
Restarting with the same file skips the pairs already done, so an interrupted run resumes
where it stopped and adding a model id to `--models` only runs that model. A file written
with other task settings (template, shots, mode, max_tokens) is refused rather than mixed.

One results line:

    {"task": "gsm8k", "settings": "<fingerprint of the task settings>", "model": "cool-fusion",
     "item_id": "gsm8k/3", "output": "...", "target": "18", "scores": {"accuracy": 1.0},
     "ppl": 1.37, "ppl_steps": 41, "steps": 52, "wins": {"smollm2-135m": 30, "gemma3-270m": 22},
     "finish_reason": "stop", "usage": {...}, "latency_s": 12.3, "column": 0,
     "model_id": "cool-fusion", "fusion": {}}

`model` is the table column's label as given to --models: a model id, or a model id with
fusion settings (`cool-fusion:geo_mean_ppl`, coolfusion.evaluation.columns), whose id and settings are
`model_id` and `fusion`.

Perplexity of an answer as judged by the source models (paper Table 3, first row)
------------------------------------------------------------------------------
Each request asks the server to judge the answer (`"fusion": {"judge": true}`): every
source model scores the whole answer after the prompt, and the choice's `fusion_judge`
carries `{"ppl": {model: value}, "mean_ppl"}`. `ppl(answer)` is that `mean_ppl`, the same
measure for every model id (source models, Cool, Rerank). Only when a server gives no
`fusion_judge` does the runner fall back to the trace, as follows.

Each request asks for the fusion trace (`"fusion": {"trace": true}` in the request body;
`--no-trace` leaves it out for servers without that extension). The response's
`fusion_trace` is a list of steps, each with the `candidates` of that step (`text`,
`proposed_by`, per-model `ppl`, and `mean_ppl` = the average over the source models of
their perplexities of that candidate, or null when scoring was skipped because all
proposals agreed) and the `winner` (the name of the winning candidate's first proposer;
coolfusion/server/response_bodies.py writes this shape). We define

    ppl(answer) = mean over the answer's steps whose winning candidate has a numeric
                  mean_ppl, of that mean_ppl      (a plain step average, not token-weighted)

and null when no step has one. Steps whose winner was not scored (every model proposed the
same text) are left out, not counted as 1. For `rerank` and `cool-fusion-rerank` the trace
holds one step whose candidates are whole continuations, so ppl(answer) is the winner's
mean PPL over the whole answer. For a single source model the server's trace has one
candidate per step; when the server does not score it, ppl(answer) is null and the table
shows "-" (as the paper's Table 3 does for some columns). `ppl_steps` counts the steps that
entered the average and `steps` all steps. The report's row is the mean of ppl(answer) over
the answers that have one. The winner of a step is the candidate marked `selected`/`winner`
true, else the one whose `proposed_by` holds the step's `winner`, else the one whose text
equals the step's `winner`, else the one whose text equals the step's `text` (which may be
cut at a stop string, so it is tried last), else the only candidate.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from coolfusion.evaluation.columns import parse_column
from coolfusion.evaluation.tasks import Item, Request, Task, TaskError


class ResultsMismatch(TaskError):
    """The results file holds answers produced with other task settings."""


# ---------------------------------------------------------------- results file


def load_results(path: str | Path) -> list[dict]:
    """Every complete line of a results file ([] when it does not exist).

    A last line cut short by a crash is ignored (it is rewritten on the next run).
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                print(f"warning: {path}:{n}: ignoring an incomplete last line", file=sys.stderr)
                continue
            raise TaskError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(rec, dict) or "model" not in rec or "item_id" not in rec:
            raise TaskError(f"{path}:{n}: not a results line (needs 'model' and 'item_id')")
        records.append(rec)
    return records


def check_settings(records: Iterable[dict], task: Task, path: str | Path) -> None:
    want = task.fingerprint()
    for rec in records:
        if rec.get("task") != task.name or rec.get("settings") != want:
            raise ResultsMismatch(
                f"{path} holds results of task {rec.get('task')!r} with settings "
                f"{rec.get('settings')!r}, but this run is task {task.name!r} with settings {want!r} "
                f"(template, shots, mode or max_tokens differ); use another --results file")


class _Appender:
    """Appends JSON lines, one flush per line, repairing a torn last line first."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
            if torn:  # drop the partial line load_results ignored
                text = path.read_text(encoding="utf-8")
                path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
        self._f = path.open("a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------- trace -> perplexity


def find_trace(response: dict) -> list[dict] | None:
    """The fusion trace of a response as a list of steps, or None when there is none."""
    choices = response.get("choices") or [{}]
    for holder in (response, choices[0] if isinstance(choices[0], dict) else {}):
        for key in ("fusion_trace", "trace"):
            steps = holder.get(key)
            if steps is not None:
                break
        else:
            fusion = holder.get("fusion")
            steps = fusion.get("trace") if isinstance(fusion, dict) else None
        if isinstance(steps, dict):
            steps = steps.get("steps")
        if isinstance(steps, list):
            return [s for s in steps if isinstance(s, dict)]
    return None


def winning_candidate(step: dict) -> dict | None:
    cands = [c for c in step.get("candidates") or [] if isinstance(c, dict)]
    if not cands:
        return None
    for c in cands:
        if c.get("selected") is True or c.get("winner") is True:
            return c
    winner = step.get("winner")
    if isinstance(winner, str):  # our server: the winner's first proposer; accept its text too
        for c in cands:
            if winner in (c.get("proposed_by") or ()):
                return c
        for c in cands:
            if c.get("text") == winner:
                return c
    if isinstance(winner, int) and not isinstance(winner, bool) and 0 <= winner < len(cands):
        return cands[winner]
    for c in cands:
        if "text" in step and c.get("text") == step["text"]:
            return c
    return cands[0] if len(cands) == 1 else None


def answer_ppl(steps: list[dict] | None) -> tuple[float | None, int, int, dict[str, int]]:
    """(ppl, steps averaged, steps, segments won per proposer); see the module docstring."""
    if not steps:
        return None, 0, 0, {}
    values: list[float] = []
    wins: Counter[str] = Counter()
    for step in steps:
        c = winning_candidate(step)
        if c is None:
            continue
        for who in c.get("proposed_by") or ():
            wins[str(who)] += 1
        v = c.get("mean_ppl")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:  # not NaN
            values.append(float(v))
    ppl = sum(values) / len(values) if values else None
    return ppl, len(values), len(steps), dict(wins)


# ---------------------------------------------------------------- requests


def call(client: Any, column: str, req: Request, *, trace: bool = True) -> dict:
    """One request of a table column (a model id, maybe with fusion settings: coolfusion.evaluation.columns)
    through the openai client; the response as a plain dict."""
    col = parse_column(column)
    kwargs: dict[str, Any] = {"model": col.model, "max_tokens": req.max_tokens, "temperature": 0.0}
    if req.stop:
        kwargs["stop"] = list(req.stop)
    fusion = dict(col.fusion)
    if trace:
        fusion.update(trace=True, judge=True)
    if fusion:
        kwargs["extra_body"] = {"fusion": fusion}
    if req.mode == "chat":
        resp = client.chat.completions.create(messages=req.messages(), **kwargs)
    else:
        resp = client.completions.create(prompt=req.prompt, **kwargs)
    # model_dump keeps the fields the SDK does not know, such as fusion_trace
    return resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)


def output_text(response: dict, mode: str) -> str:
    choices = response.get("choices") or []
    if not choices:
        raise TaskError("response has no choices")
    c = choices[0]
    text = (c.get("message") or {}).get("content") if mode == "chat" else c.get("text")
    return text or ""


def evaluate_one(client: Any, task: Task, item: Item, model: str, *, trace: bool = True,
                 keep_trace: bool = False) -> dict:
    """Request, score and summarise one (model, item) pair as a results line."""
    req = task.request(item)
    t0 = time.perf_counter()
    response = call(client, model, req, trace=trace)
    latency = time.perf_counter() - t0
    output = output_text(response, req.mode)
    steps = find_trace(response)
    ppl, ppl_steps, n_steps, wins = answer_ppl(steps)
    choice = (response.get("choices") or [{}])[0]
    judge = choice.get("fusion_judge") or response.get("fusion_judge")
    if isinstance(judge, dict) and isinstance(judge.get("mean_ppl"), (int, float)):
        ppl = float(judge["mean_ppl"])
    col = parse_column(model)
    rec = {
        "task": task.name, "settings": task.fingerprint(), "model": model, "item_id": item.id,
        "model_id": col.model, "fusion": col.fusion,
        "output": output,
        "target": item.target if isinstance(item.target, str) else list(item.target),
        "scores": task.score(output, item),
        "ppl": ppl, "ppl_steps": ppl_steps, "steps": n_steps, "wins": wins,
        "finish_reason": choice.get("finish_reason"),
        "usage": response.get("usage"),
        "latency_s": round(latency, 4),
    }
    if keep_trace:
        rec["trace"] = steps
    return rec


def models_in_column_order(records: list[dict]) -> list[str]:
    """The model ids of a results file in the order of the run's --models (`column`), then
    in order of appearance (files written before the column was recorded)."""
    first: dict[str, tuple[float, int]] = {}
    for i, r in enumerate(records):
        key = (r.get("column", float("inf")), i)
        if r["model"] not in first or key < first[r["model"]]:
            first[r["model"]] = key
    return sorted(first, key=first.get)


@dataclass
class RunSummary:
    total: int  # (model, item) pairs asked for
    skipped: int  # already in the results file
    done: int  # answered in this run
    failed: int
    wall_s: float
    errors: list[str] = field(default_factory=list)  # the first few failure messages
    stopped: bool = False  # gave up after max_failures


def run_task(task: Task, items: list[Item], models: list[str], client: Any,
             results_path: str | Path, *, concurrency: int = 1, trace: bool = True,
             keep_trace: bool = False, max_failures: int = 10, progress: bool = True,
             progress_file=None) -> RunSummary:
    """Answer every (model, item) pair missing from the results file; see the module docstring."""
    if concurrency < 1:
        raise TaskError("--concurrency must be >= 1")
    results_path = Path(results_path)
    existing = load_results(results_path)
    check_settings(existing, task, results_path)
    done = {(r["model"], r["item_id"]) for r in existing}
    pairs = [(m, it) for it in items for m in models]  # item-major: models stay comparable
    todo = [(m, it) for m, it in pairs if (m, it.id) not in done]
    summary = RunSummary(total=len(pairs), skipped=len(pairs) - len(todo), done=0, failed=0, wall_s=0.0)
    t0 = time.perf_counter()
    bar = tqdm(total=len(pairs), initial=summary.skipped, desc=task.name, unit="req",
               disable=not progress, file=progress_file, dynamic_ncols=True)
    out = _Appender(results_path)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="eval")
    queue = iter(todo)
    running: dict[Future, tuple[str, Item]] = {}
    interrupted = True

    def submit_next() -> None:
        if summary.stopped:
            return
        for m, it in queue:
            running[pool.submit(evaluate_one, client, task, it, m, trace=trace,
                                keep_trace=keep_trace)] = (m, it)
            return

    try:
        for _ in range(concurrency):  # at most `concurrency` requests in flight
            submit_next()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                m, it = running.pop(fut)
                try:
                    # the column keeps --models' order for a later --report-only (answers land
                    # in the file in completion order)
                    out.write({**fut.result(), "column": models.index(m)})
                    summary.done += 1
                except Exception as err:  # noqa: BLE001 - one failed request must not end the run
                    summary.failed += 1
                    msg = f"{m} {it.id}: {type(err).__name__}: {err}"
                    if len(summary.errors) < 5:
                        summary.errors.append(msg)
                    bar.write(f"failed: {msg}", file=progress_file or sys.stderr)
                    if max_failures and summary.failed >= max_failures and not summary.stopped:
                        summary.stopped = True  # let the requests in flight finish, send no more
                        bar.write(f"stopping after {summary.failed} failed requests",
                                  file=progress_file or sys.stderr)
                bar.update(1)
                submit_next()
        interrupted = False
    finally:
        # on Ctrl-C don't wait for requests in flight; every finished answer is already on disk
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        out.close()
        bar.close()
        summary.wall_s = time.perf_counter() - t0
    return summary

"""The side-by-side table of one task (the paper's Table 3 layout) and its bar chart.

`build_report(task, records, models, items)` reduces results lines to one column per model
id with these rows:

- `avg PPL (source models)`: mean over the answers of their perplexity as judged by the
  source models (definition in `coolfusion.evaluation.runner`), "-" when the server gave none;
- the task's metric(s): accuracy, or EM and F1 (fractions, as in the paper's tables);
- `Δ <metric> vs <best source> (± SE)`: for every column, the paired difference of the
  metric against the better source model alone (the source column with the highest mean of
  the task's first metric), over the items both answered: mean of the per-item differences
  and its standard error sd/sqrt(n), so a reader can tell a gain from noise (shown when the
  table has a source model column and a column to compare);
- `ended (stop)`: the fraction of answers that ended by themselves or at a stop string
  (finish_reason "stop"), not at the generation budget;
- `items`: answers in the column;
- `time (s)`: the sum of that model id's request latencies (with `--concurrency` above 1
  requests overlap, so the columns add up to more than the wall-clock time).

Only the given items count, so a results file that holds more (an earlier run with a
larger `--limit`) still yields a table of exactly the items asked for.
`write_report` writes `<name>.md`, `<name>.json` and `<name>.png` (the headline metric per
model id, bars like the paper's figures; EM and F1 side by side for SQuAD).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from coolfusion.evaluation.columns import parse_column
from coolfusion.evaluation.tasks import Item, Task
from coolfusion.extras import require

PPL_ROW = "avg PPL (source models)"
ENDED_ROW = "ended (stop)"
METRIC_NAMES = {"accuracy": "accuracy", "em": "EM", "f1": "F1"}


def build_report(task: Task, records: Iterable[dict], models: list[str], items: list[Item],
                 *, wall_s: float | None = None) -> dict:
    wanted = {it.id for it in items}
    by_model: dict[str, list[dict]] = {m: [] for m in models}
    for rec in records:
        if rec.get("model") in by_model and rec.get("item_id") in wanted:
            by_model[rec["model"]].append(rec)
    columns = {}
    for m, recs in by_model.items():
        n = len(recs)
        ppls = [r["ppl"] for r in recs if isinstance(r.get("ppl"), (int, float))]
        col = {
            "items": n,
            "ppl": sum(ppls) / len(ppls) if ppls else None,
            "ppl_answers": len(ppls),  # answers that had a perplexity
            "time_s": round(sum(float(r.get("latency_s") or 0.0) for r in recs), 3),
            "ended": sum(r.get("finish_reason") == "stop" for r in recs) / n if n else None,
        }
        for metric in task.metrics:
            vals = [float(r["scores"][metric]) for r in recs if metric in (r.get("scores") or {})]
            col[metric] = sum(vals) / len(vals) if vals else None
        columns[m] = col
    baseline = _best_source(models, columns, task.metrics[0])
    paired = {}
    if baseline is not None and len(models) > 1:
        for metric in task.metrics:
            paired[metric] = {m: _paired(by_model[m], by_model[baseline], metric) for m in models}
    return {
        "task": task.name,
        "shots": task.shots,
        "mode": task.mode,
        "settings": task.fingerprint(),
        "items_requested": len(items),
        "metrics": list(task.metrics),
        "models": list(models),
        "columns": columns,
        "baseline": baseline if paired else None,
        "paired": paired,  # metric -> column -> {"diff", "se", "n"} against the baseline
        "wall_s": None if wall_s is None else round(wall_s, 3),
    }


def _best_source(models: list[str], columns: dict, metric: str) -> str | None:
    sources = [m for m in models if parse_column(m).is_source and columns[m].get(metric) is not None]
    return max(sources, key=lambda m: columns[m][metric]) if sources else None  # first of equals


def _paired(recs: list[dict], base: list[dict], metric: str) -> dict:
    """Mean and standard error of the per-item difference recs - base over shared items."""
    ref = {r["item_id"]: float(r["scores"][metric]) for r in base if metric in (r.get("scores") or {})}
    d = [float(r["scores"][metric]) - ref[r["item_id"]] for r in recs
         if r["item_id"] in ref and metric in (r.get("scores") or {})]
    n = len(d)
    if n == 0:
        return {"diff": None, "se": None, "n": 0}
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return {"diff": mean, "se": sd / math.sqrt(n), "n": n}


def _fmt_paired(p: dict) -> str:
    return "-" if p["diff"] is None else f"{p['diff']:+.4f} ± {p['se']:.4f}"


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def to_markdown(report: dict) -> str:
    models = report["models"]
    cols = report["columns"]
    rows = [[PPL_ROW] + [_fmt(cols[m]["ppl"], 2) for m in models]]
    for metric in report["metrics"]:
        rows.append([METRIC_NAMES.get(metric, metric)] + [_fmt(cols[m][metric], 4) for m in models])
    for metric, per in (report.get("paired") or {}).items():
        name = f"Δ {METRIC_NAMES.get(metric, metric)} vs {report['baseline']} (± SE)"
        rows.append([name] + ["(baseline)" if m == report["baseline"] else _fmt_paired(per[m]) for m in models])
    rows.append([ENDED_ROW] + [_fmt(cols[m].get("ended"), 3) for m in models])
    rows.append(["items"] + [str(cols[m]["items"]) for m in models])
    rows.append(["time (s)"] + [f"{cols[m]['time_s']:.1f}" for m in models])
    head = ["metric"] + models
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    caption = (f"Task `{report['task']}`, {report['shots']}-shot, {report['mode']} mode, "
               f"{report['items_requested']} items requested (settings {report['settings']}).")
    if report.get("wall_s") is not None:
        caption += f" Wall-clock time of this run: {report['wall_s']:.1f} s."
    return "\n".join(lines) + "\n\n" + caption + "\n"


def plot(report: dict, path: str | Path) -> None:
    """Bar chart of the task's metric(s) per model id, written as PNG."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    metrics = report["metrics"]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(models) + 1.5), 3.6))
    for k, metric in enumerate(metrics):
        vals = [report["columns"][m][metric] or 0.0 for m in models]
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(models))]
        bars = ax.bar(xs, vals, width, label=METRIC_NAMES.get(metric, metric))
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], fontsize=7, padding=2)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(" / ".join(METRIC_NAMES.get(m, m) for m in metrics))
    top = max([report["columns"][m][k] or 0.0 for m in models for k in metrics] + [0.0])
    ax.set_ylim(0, min(1.1, top * 1.25) if top > 0 else 1.0)  # room for the labels
    n = max((report["columns"][m]["items"] for m in models), default=0)
    ax.set_title(f"{report['task']} ({report['shots']}-shot, n={n})", fontsize=10)
    if len(metrics) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write `<name>.md`, `<name>.json` and `<name>.png` under out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{name}.md", "json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(report, paths["png"])
    return paths

"""`coolfusion eval` (and `python -m coolfusion.evaluation`): run a task, then write the table and chart.

`add_arguments(parser)` declares the options and `run(args) -> int` does the work; the
`coolfusion` command (coolfusion/server/cli.py) wires them as its `eval` subcommand.

Either `--base-url` names a running OpenAI-compatible server, or `--config` starts one
in-process from a config file for the duration of the run. The answers go to the
`--results` JSONL file (resumable, see coolfusion.evaluation.runner); the table goes to stdout and, with
the chart, next to the results file (or to `--out-dir`) as <name>.md, <name>.json and
<name>.png, <name> being the results file's stem. Exit status: 0 when every pair is
answered, 1 when some requests failed (the table covers what was answered), 2 on a usage,
data or connection error, 130 when interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from coolfusion.evaluation.columns import parse_column, split_columns
from coolfusion.evaluation.report import build_report, to_markdown, write_report
from coolfusion.evaluation.runner import check_settings, load_results, models_in_column_order, run_task
from coolfusion.evaluation.tasks import MODES, TASK_NAMES, TaskError, load_task
from coolfusion.extras import require

openai = require("openai", "eval")  # the client of the server under evaluation
require("matplotlib", "eval")  # the chart (coolfusion.evaluation.report.plot), checked before a long run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="task to run")
    p.add_argument("--models", type=_csv, default=None, metavar="A,B,C",
                   help="table columns: model ids, each optionally with fusion settings, e.g. "
                        "cool-fusion:geo_mean_ppl or 'cool-fusion:select=weighted+weights=auto' "
                        "(docs/selection.md; default: every id in /v1/models)")
    p.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="evaluate the first N items only (default: all)")
    p.add_argument("--shots", type=int, default=None, metavar="K",
                   help="few-shot examples (default: the template's)")
    p.add_argument("--template", default=None, metavar="FILE",
                   help="prompt template file (default: coolfusion/evaluation/prompts/<task>.yaml)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="completion or chat API (default: the template's)")
    p.add_argument("--max-tokens", type=_positive, default=None, metavar="N",
                   help="generation budget per answer (default: the template's)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--base-url", default=None, metavar="URL",
                       help="running server, e.g. http://127.0.0.1:8000/v1 (default: that)")
    where.add_argument("--config", default=None, metavar="FILE",
                       help="start a server in-process from this config file instead")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $COOLFUSION_API_KEY, $OPENAI_API_KEY, or none)")
    p.add_argument("--concurrency", type=_positive, default=1, metavar="N",
                   help="requests in flight at once (default: 1)")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="results JSONL, resumed if it exists (default: runs/<task>.jsonl)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where the .md/.json/.png go (default: beside the results file)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data folder (default: $COOLFUSION_DATA, else the copies shipped in coolfusion/evaluation/data)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="per-request timeout in seconds (default: 600)")
    p.add_argument("--max-failures", type=int, default=10, metavar="N",
                   help="stop sending after N failed requests; 0 = never (default: 10)")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="don't ask for the fusion trace (servers without it; no PPL row)")
    p.add_argument("--keep-trace", action="store_true",
                   help="store each answer's whole fusion trace in the results file")
    p.add_argument("--report-only", action="store_true",
                   help="send nothing; rebuild the table and chart from the results file")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except TaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every finished answer is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coolfusion.evaluation", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


# ---------------------------------------------------------------- the steps


def _run(args: argparse.Namespace) -> int:
    task = load_task(args.task, data_dir=args.data_dir, template=args.template, shots=args.shots,
                     mode=args.mode, max_tokens=args.max_tokens)
    items = task.select(args.limit)
    results = Path(args.results or Path("runs") / f"{task.name}.jsonl")
    out_dir = Path(args.out_dir) if args.out_dir else results.parent
    summary = None
    records = load_results(results)
    check_settings(records, task, results)  # before a --config server spends minutes loading
    if args.report_only:
        models = args.models or models_in_column_order(records)
        if not models:
            raise TaskError(f"{results} holds no results")
    else:
        with _server(args) as (base_url, api_key):
            client = _client(base_url, api_key, args.timeout)
            models = _check_models(args.models, client, base_url)
            print(f"{task.name}: {len(items)} items x {len(models)} model ids "
                  f"({', '.join(models)}) -> {results}", file=sys.stderr)
            summary = run_task(task, items, models, client, results, concurrency=args.concurrency,
                               trace=args.trace, keep_trace=args.keep_trace,
                               max_failures=args.max_failures, progress=args.progress)
        print(f"answered {summary.done}, already done {summary.skipped}, failed {summary.failed}"
              f" in {summary.wall_s:.1f} s", file=sys.stderr)
        records = load_results(results)
    report = build_report(task, records, models, items,
                          wall_s=summary.wall_s if summary is not None else None)
    paths = write_report(report, out_dir, results.stem)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if summary is not None and summary.failed:
        for e in summary.errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


def _client(base_url: str, api_key: str, timeout: float):
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)


def _check_models(wanted: list[str] | None, client, base_url: str) -> list[str]:
    """The ids to run: `wanted` (each must be listed by /v1/models), else every listed id."""
    try:
        listed = [m.id for m in client.models.list()]
    except openai.NotFoundError:  # a server without /v1/models: trust --models
        if wanted:
            return wanted
        raise TaskError(f"{base_url} has no /v1/models; pass --models") from None
    except openai.OpenAIError as err:
        raise TaskError(f"cannot list the models of {base_url}: {err}") from None
    if not wanted:
        return listed
    unknown = [m for m in wanted if parse_column(m).model not in listed]
    if unknown:
        raise TaskError(f"{base_url} does not serve {', '.join(unknown)}; it serves {', '.join(listed)}")
    return wanted


def normalize_base_url(url: str) -> str:
    """Accept the server root or its /v1; the openai client wants the /v1 URL."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _api_key(args: argparse.Namespace, configured: str | None = None) -> str:
    return (args.api_key or configured or os.environ.get("COOLFUSION_API_KEY")
            or os.environ.get("OPENAI_API_KEY") or "none")


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(base_url, api_key) of the server to use, started in-process when --config is given."""
    if args.config is None:
        yield normalize_base_url(args.base_url or "http://127.0.0.1:8000/v1"), _api_key(args)
        return
    # Imported here: the engine pulls in torch and the models only when a config is given.
    from coolfusion.config import load_config
    from coolfusion.engine.engine import Engine
    from coolfusion.server.testing import serve_in_thread

    try:
        from coolfusion.server.app import create_app
    except ImportError:
        from coolfusion.server import create_app

    cfg = load_config(args.config)
    engine = Engine.from_config(cfg)
    try:
        handle = serve_in_thread(create_app(engine, cfg.server))
        ctx = handle if hasattr(handle, "__enter__") else contextlib.nullcontext(handle)
        with ctx as served:
            url = served if isinstance(served, str) else (
                getattr(served, "base_url", None) or getattr(served, "url"))
            try:
                yield normalize_base_url(str(url)), _api_key(args, cfg.server.api_key)
            finally:
                stop = None if ctx is handle else (getattr(served, "stop", None) or getattr(served, "close", None))
                if stop is not None:
                    stop()
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


def _csv(text: str) -> list[str]:
    ids = split_columns(text)
    if not ids:
        raise argparse.ArgumentTypeError("give at least one model id")
    try:
        for label in ids:
            parse_column(label)
    except TaskError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return ids


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {n}")
    return n

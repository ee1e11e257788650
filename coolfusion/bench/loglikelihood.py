"""`python -m coolfusion.bench.loglikelihood`: what an echoed log-likelihood request costs on
each model id (docs/logprobs.md, "What a fused log-likelihood costs").

A public LAMBADA passage (coolfusion/evaluation/data/lambada_test_public.jsonl: the first
one of `--tokens` reference tokens) is scored with `echo: true, max_tokens: 0` and
`logprobs: 0`, then `logprobs: 1`, on every model id, through the engine (no HTTP), after
one untimed warm-up request, each from an empty cache of alternatives (`--repeat N`: N such
pairs); it prints the wall time of each, their ratio and, for the fused id,
the share of positions each path of coolfusion.engine.alternatives answered. `--passages N`
adds the shares over the first N passages (each scored once with `logprobs: 1`);
`--check` compares every alternative of the timed passage with the `max_tokens: 1`
generation that defines it (slow: one generation per position); `--walks N` caps the runs of
positions walked at once (1: one after another, to see what walking them at once gains).

`--lm-eval TASKS` instead runs lm-evaluation-harness (`local-completions`, token-id requests
in the tokenizer `coolfusion tokenizer` saves, as docs/logprobs.md shows) against a server
on loopback, on each model id and each task of tests/lm_eval_tasks (e.g.
`coolfusion_lambada,coolfusion_mc`) with `--limit` items, and prints each run's wall time
and metrics. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from coolfusion.config import load_config
from coolfusion.core.types import COOL, GenerationRequest
from coolfusion.engine.alternatives import MAX_WALKS, Alternatives
from coolfusion.engine.engine import Engine

DATA = Path(__file__).resolve().parent.parent / "evaluation" / "data" / "lambada_test_public.jsonl"


def passages() -> list[str]:
    return [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()]


def passage_of(eng: Engine, n_tokens: int) -> tuple[int, list[int]]:
    """The first passage of exactly `n_tokens` reference tokens (fused ids' reference)."""
    ref = eng.reference(COOL)
    for i, text in enumerate(passages()):
        ids = ref.text.encode(text, special=True)
        if len(ids) == n_tokens:
            return i, ids
    raise SystemExit(f"no passage of {n_tokens} tokens")


def score(eng: Engine, model: str, ids: list[int], top: int):
    """One echoed request on the token ids; returns (seconds, its TokenLogprobs)."""
    t = time.perf_counter()
    steps = list(eng.generate(GenerationRequest(prompt_ids=tuple(ids), model=model, max_tokens=0, echo=True,
                                                logprobs=top)))
    return time.perf_counter() - t, [e for s in steps for e in s.logprobs]


def shares(paths: Counter) -> str:
    total = sum(paths.values()) or 1
    return ", ".join(f"{k} {paths[k]} ({100 * paths[k] / total:.0f}%)" for k in ("cached", "known", "step", "request"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coolfusion.bench.loglikelihood", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--tokens", type=int, default=76, help="reference tokens of the timed passage (default 76)")
    p.add_argument("--passages", type=int, default=0, help="also count the paths over the first N passages")
    p.add_argument("--check", action="store_true", help="compare each alternative with its max_tokens-1 generation")
    p.add_argument("--walks", type=int, default=MAX_WALKS,
                   help=f"runs of positions walked at once, at most (default {MAX_WALKS}; 1: one walk)")
    p.add_argument("--repeat", type=int, default=1, help="time each model id's pair of requests this many times")
    p.add_argument("--lm-eval", dest="lm_eval", default="", help="run lm-eval on these tasks instead (comma-separated)")
    p.add_argument("--limit", type=int, default=100, help="lm-eval: items per task (default 100)")
    p.add_argument("--models", default="", help="lm-eval: model ids (default: every source model and cool-fusion)")
    args = p.parse_args(argv)
    eng = Engine.from_config(load_config(args.config))
    try:
        if args.lm_eval:
            models = args.models.split(",") if args.models else eng.source_names + [COOL]
            return run_lm_eval(eng, args.config, args.lm_eval.split(","), models, args.limit)
        index, ids = passage_of(eng, args.tokens)
        print(f"passage {index} of {DATA.name}: {len(ids)} reference tokens ({eng.reference(COOL).name})")
        print("| model id | `logprobs: 0` | `logprobs: 1` | ratio |\n|---|---|---|---|")
        for model in eng.source_names + [COOL]:
            own = eng.reference(model).text.encode(eng.reference(COOL).text.decode(ids), special=True)
            score(eng, model, own, 0)  # warm-up: the first forwards of a shape are slow
            for _ in range(args.repeat):
                times = []
                for top in (0, 1):
                    eng.alternatives = Alternatives(max_walks=args.walks)  # every run from an empty cache
                    seconds, got = score(eng, model, own, top)
                    times.append(seconds)
                print(f"| {model} | {times[0]:.2f} s | {times[1]:.2f} s | {times[1] / times[0]:.1f}x |", flush=True)
        print(f"{COOL} paths on this passage: {shares(eng.alternatives.paths)}")
        if args.check:
            check(eng, ids, got)
        if args.passages:
            eng.alternatives = Alternatives()
            ref = eng.reference(COOL)
            for text in passages()[: args.passages]:
                score(eng, COOL, ref.text.encode(text, special=True), 1)
            print(f"{COOL} paths over the first {args.passages} passages: {shares(eng.alternatives.paths)}")
    finally:
        eng.close()
    return 0


def check(eng: Engine, ids: list[int], got) -> None:
    """Each position's alternative against the generation that defines it (`Alternatives.get`)."""
    definition = Alternatives()
    bad = 0
    for j in range(1, len(ids)):
        tid, text, value = definition.get(eng, COOL, tuple(ids[:j]), None)
        want = (text, got[j].logprob if tid == ids[j] else value)
        (have,) = got[j].top
        if have[0] != want[0] or abs(have[1] - want[1]) > 1e-4:
            bad += 1
            print(f"position {j}: {have} != {want}")
    print(f"check: {len(ids) - 1 - bad} of {len(ids) - 1} alternatives equal their max_tokens-1 generation")


def run_lm_eval(eng: Engine, config: str, tasks: list[str], models: list[str], limit: int) -> int:
    """lm-eval local-completions on each task and model id; prints wall time and metrics."""
    from coolfusion.config import ServerConfig
    from coolfusion.server.app import create_app
    from coolfusion.server.cli import main as coolfusion
    from coolfusion.server.testing import serve_in_thread

    print("| task | model id | items | wall | metrics |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(create_app(eng, ServerConfig())) as url:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_CACHE": str(Path(tmp) / "hf_datasets")}
        for model in models:
            tok_dir = Path(tmp) / f"tokenizer-{model}"
            assert coolfusion(["tokenizer", model, str(tok_dir), "--config", config]) == 0
            ref = eng.reference(model).text  # a tokenizer that adds a BOS wants lm-eval to add it too
            bos = ",add_bos_token=True" if len(ref.encode("a", special=True)) > len(ref.encode("a")) else ""
            for task in tasks:
                out = Path(tmp) / f"out-{model}-{task}"
                cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                       f"model={model},base_url={url}/v1/completions,tokenizer={tok_dir},tokenizer_backend=huggingface,"
                       f"tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=600{bos}",
                       "--tasks", task, "--include_path", "tests/lm_eval_tasks", "--limit", str(limit),
                       "--output_path", str(out)]
                eng.alternatives = Alternatives()  # each run from an empty cache, its paths counted
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                if proc.returncode != 0:
                    print(f"| {task} | {model} | {limit} | {wall:.0f} s | lm_eval exited {proc.returncode}: "
                          f"{proc.stderr[-300:]!r} |", flush=True)
                    continue
                result = json.loads(next(out.rglob("results_*.json")).read_text())
                row = result["results"][task]
                items = result.get("n-samples", {}).get(task, {}).get("effective", limit)
                metrics = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in row.items()
                                    if isinstance(v, float) and "stderr" not in k)
                paths = f"; paths: {shares(eng.alternatives.paths)}" if eng.alternatives.paths else ""
                print(f"| {task} | {model} | {items} | {wall:.0f} s | {metrics}{paths} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m coolfusion.bench.auto_weights`: the `weights: auto` weights (coolfusion.core.selection) that the
configured models get on the first prompts of the LAMBADA and SQuAD evaluation tasks
(docs/selection.md): min, median and max of the first model's weight."""

from __future__ import annotations

import argparse
import statistics

from coolfusion.evaluation.tasks import load_task
from coolfusion.config import load_config
from coolfusion.engine.engine import Engine
from coolfusion.core.selection import SelectionRequest
from coolfusion.core.types import GenerationRequest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coolfusion.bench.auto_weights", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--prompts", type=int, default=20, help="first N items of each task (default 20)")
    p.add_argument("--tasks", default="lambada,squad")
    args = p.parse_args(argv)
    eng = Engine.from_config(load_config(args.config))
    first = eng.source_names[0]
    try:
        for name in args.tasks.split(","):
            task = load_task(name)
            ws = []
            for it in task.select(args.prompts):
                req = GenerationRequest(prompt=task.prompt(it), max_tokens=1,
                                        selection=SelectionRequest(select="weighted", weights="auto"))
                ws.append(eng.selection_for(req).weights[first])
            print(f"{name}: w({first}) over {len(ws)} prompts: min {min(ws):.3f} "
                  f"median {statistics.median(ws):.3f} max {max(ws):.3f}")
    finally:
        eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

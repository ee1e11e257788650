"""Time the LM head's product for 1 to 64 rows: F.linear (MKL) against the oneDNN product
that coolfusion/runtime/lm_head.py installs, at the embedded pair's head shapes (random
weights), and their largest difference.

    python scripts/lm_head_rows.py [--threads 2] [--reps 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from coolfusion.runtime import lm_head

SHAPES = {"gemma3-270m": (262144, 640), "smollm2-135m": (49152, 576)}


class _Model(torch.nn.Module):  # just an output embedding, for lm_head.install
    def __init__(self, n: int, k: int):
        super().__init__()
        self.head = torch.nn.Linear(k, n, bias=False)

    def get_output_embeddings(self):
        return self.head


def timed(f, reps: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1000


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--rows", default="1,2,3,4,8,16,32,64")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"threads {a.threads}; ms per product by rows: F.linear / oneDNN")
    for name, (n, k) in SHAPES.items():
        model = _Model(n, k)
        w = model.head.weight.detach().clone()
        lm_head.install(model)
        cells, diff = [], 0.0
        for m in [int(r) for r in a.rows.split(",")]:
            h = torch.randn(m, k)
            lin = timed(lambda: torch.nn.functional.linear(h, w), a.reps)
            dnn = timed(lambda: model.head(h), a.reps)
            diff = max(diff, (model.head(h) - torch.nn.functional.linear(h, w)).abs().max().item())
            cells.append(f"{m}: {lin:.0f}/{dnn:.0f}")
        print(f"{name} ({n} x {k})  " + "  ".join(cells) + f"  (largest difference {diff:.1e})", flush=True)


if __name__ == "__main__":
    main()

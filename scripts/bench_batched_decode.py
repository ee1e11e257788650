"""Cost of one decode step for B requests: one batched forward over slots vs B forwards alone.

    python scripts/bench_batched_decode.py [--context 100] [--batch 1,2,4,8] [--repeats 7]

For each configured model (config.yaml) and each B, every request holds `context` tokens and
decodes one token; the step is timed as
  alone         B separate single-request forwards through today's path (GrowingLayer cache)
  views         one coolfusion.runtime.batched_forward.forward, per-item SDPA on slot views, enable_gqa
  views/repeat  the same with repeat_kv copies (what transformers' sdpa does under a mask)
  gather        one forward, padded attention over the items' rows gathered per layer
  padded        views, padded to max(B) rows (load-invariant logits: BatchScheduler(pad_decode_to))
Each timed step is undone (crop back to `context`) so the context stays fixed. Variants
alternate within each repeat and the median is printed: on a shared CPU timings swing, so
read the ratios of one run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coolfusion.runtime import kvcache  # noqa: E402
from coolfusion.runtime.batched_forward import Item, forward  # noqa: E402
from coolfusion.runtime.slots import SlotStorage  # noqa: E402


def alone_step(model, kw, caches, ctx, tok):
    for c in caches:
        pos = torch.tensor([[ctx]])  # (1, 1)
        with torch.inference_mode():
            model(input_ids=torch.tensor([[tok]]), position_ids=pos, cache_position=pos[0], use_cache=True,
                  logits_to_keep=1, **{kw: c})
        kvcache.crop(c, ctx)


def batched_step(model, st, slots, ctx, tok, layout, gqa, pad_to=0):
    forward(model, st, [Item(s, [tok]) for s in slots], layout=layout, gqa=gqa, pad_to=pad_to)
    for s in slots:
        st.crop(s, ctx)


def bench_model(name, model, args):
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    bmax = max(args.batch)
    prompts = [torch.randint(0, vocab, (args.context,), generator=g).tolist() for _ in range(bmax)]
    st = SlotStorage.for_model(model, slots=bmax, max_len=args.context + 8)
    slots = [st.alloc() for _ in range(bmax)]
    forward(model, st, [Item(s, p) for s, p in zip(slots, prompts)])  # prefill every slot once
    caches = []
    for p in prompts:
        c = kvcache.new_cache()
        with torch.inference_mode():
            model(input_ids=torch.tensor([p]), use_cache=True, logits_to_keep=1, **{kw: c})
        caches.append(c)
    print(f"\n{name}: decode step at context {args.context}, ms (median of {args.repeats}); "
          f"slot storage {st.nbytes / 2**20:.1f} MiB for {bmax} x {args.context + 8}")
    print(f"{'B':>3} {'alone':>8} {'views':>8} {'v/repeat':>9} {'gather':>8} {'padded':>8}   "
          "alone/views  repeat/views  gather/views  padded/views")
    for B in args.batch:
        variants = {
            "alone": lambda: alone_step(model, kw, caches[:B], args.context, 11),
            "views": lambda: batched_step(model, st, slots[:B], args.context, 11, "views", "enable"),
            "repeat": lambda: batched_step(model, st, slots[:B], args.context, 11, "views", "repeat"),
            "gather": lambda: batched_step(model, st, slots[:B], args.context, 11, "gather", "enable"),
            "padded": lambda: batched_step(model, st, slots[:B], args.context, 11, "views", "enable", bmax),
        }
        times = {k: [] for k in variants}
        for f in variants.values():
            f()  # warm up
        for _ in range(args.repeats):
            for k, f in variants.items():  # alternate, so a load swing hits every variant
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"{B:>3} {m['alone']:8.1f} {m['views']:8.1f} {m['repeat']:9.1f} {m['gather']:8.1f} {m['padded']:8.1f}   "
              f"{m['alone'] / m['views']:11.2f} {m['repeat'] / m['views']:13.2f} {m['gather'] / m['views']:13.2f}"
              f" {m['padded'] / m['views']:13.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--models", default="", help="comma-separated model names (default: all in config.yaml)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    from coolfusion.config import load_config
    from coolfusion.runtime.loading import load_model, resolve_source

    cfg = load_config(ROOT / "config.yaml")
    want = set(filter(None, args.models.split(",")))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for m in cfg.models:
        if want and m.name not in want:
            continue
        t = time.perf_counter()
        model = load_model(resolve_source(m), torch.device("cpu"), torch.float32)
        print(f"loaded {m.name} in {time.perf_counter() - t:.0f} s")
        bench_model(m.name, model, args)
        del model


if __name__ == "__main__":
    main()

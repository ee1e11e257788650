"""`coolfusion bench`: fused decoding against the source models' own decoding, in one run.

For the same prompts it measures (a) each source model alone with plain transformers
`generate` (greedy), (b) each source model alone through our engine, (c) `cool-fusion`,
and prints side by side: characters/s and tokens/s, time per step split into propose /
score / commit / tokenizer work, segments per request, how often all proposals agreed, and
peak memory. The floors (docs/architecture.md, section 5): with r_v the characters/s of model v under
(a), one device costs 1 / sum_v(1/r_v) per output character, one device per model min_v r_v.
`cost_growth` is the fused time per step at a ~2,000-token context over that at ~100
(medians of interleaved repeats: the two lengths see the same machine noise).

The character floor assumes the fused text is like each model's own text. It is for trained
models; random-weight models emit long random vocabulary pieces alone while the fused text,
cut at word boundaries common to every tokenizer, is made of short ones, so the characters
per token differ several-fold. The token floor prices the fused text itself: every model
decoding T_v(fused text) at its own (a) tokens/s, sum_v n_v / t_v (`fused_vs_floor_tokens`).

`--shapes` (CUDA) replaces the configured models by random-weight bf16 models shaped like
the paper's (Llama-3-8B, Phi-3-mini, GLM-4-9B) over the embedded tokenizers;
`--random-weights` keeps the configured models' architectures and tokenizers but draws
their weights at random (any device): the same models with and without training.

Then (`--speculative also`, the default; `only` runs just this) speculative proposals off and
on over the same models: forwards and busy seconds per segment, single-stream chars/s and the
aggregate of concurrent clients (8, or `--speculative-clients`), as configured and speculating at
any load (coolfusion/bench/speculative.py; `--json` writes `speculative: {off, on, on_at_any_load}`).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch

from coolfusion.bench import speculative

PROMPTS = [
    "The history of the city of Paris begins",
    "Here is a short Python function that reverses a list:\n",
    "Q: Tom has 3 apples and buys 5 more. How many apples does he have?\nA:",
    "Write a short story about a robot who learns to paint.\n",
]

# Paper-scale shapes (hidden, layers, heads, kv heads, intermediate).
SHAPES = {
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
    "phi3-mini": dict(arch="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=8192),
    "glm4-9b": dict(arch="glm4", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                    num_key_value_heads=2, intermediate_size=13696),
}


def add_arguments(p) -> None:
    p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    p.add_argument("--json", dest="json_path", default=None, help="write all figures to this JSON file")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default: 48)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts to run (max {len(PROMPTS)})")
    p.add_argument("--growth-steps", type=int, default=12, help="fused steps timed at each context length")
    p.add_argument("--growth-repeats", type=int, default=3,
                   help="interleaved repeats of the 100/2,000-token timings; medians are reported (default: 3)")
    p.add_argument("--shapes", default=None,
                   help="CUDA only: comma-separated random-weight shapes instead of the config's models "
                        f"({', '.join(SHAPES)}); tokenizers from --tokenizers")
    p.add_argument("--tokenizers", default=None,
                   help="with --shapes: comma-separated tokenizer directories, one per shape (cycled)")
    p.add_argument("--device", default="cuda", help="with --shapes: device (default: cuda)")
    p.add_argument("--random-weights", action="store_true",
                   help="the configured models' architectures and tokenizers with random weights")
    p.add_argument("--skip-hf", action="store_true", help="skip (a), plain transformers generate")
    p.add_argument("--concurrency", default=None, metavar="LIST",
                   help="instead of the single-request figures: aggregate chars/s and latency with this "
                        "many concurrent clients, e.g. 1,2,4,8 (coolfusion/bench/concurrency.py)")
    p.add_argument("--model-ids", default=None, metavar="LIST",
                   help="with --concurrency: the model ids to measure (default: cool-fusion and each source model)")
    p.add_argument("--batching", choices=["both", "on", "off"], default="both",
                   help="with --concurrency: measure with fusion.batching on, off, or both over the same "
                        "loaded models (default: both)")
    p.add_argument("--repeat", type=int, default=2,
                   help="with --concurrency and both batching modes: how many times one client runs with "
                        "batching off and on, alternating, after the levels; with the speculative section: how "
                        "many times each client level runs per setting, interleaved, the best kept (default 2)")
    p.add_argument("--speculative", choices=["also", "only", "skip"], default="also",
                   help="speculative proposals off and on over the same models (coolfusion/bench/speculative.py): "
                        "after the other figures (also, the default), alone (only), or not at all (skip)")
    p.add_argument("--speculative-clients", default="8",
                   help="the speculative section's concurrent client levels, comma-separated (default: 8)")
    p.add_argument("--ray", action="store_true",
                   help="also run (c) with backend: ray on a local Ray cluster and print the Ray "
                        "overhead per step against local; with --concurrency, the levels again with "
                        "backend: ray, outputs compared with the local backend's (needs pip install .[ray])")


def _speculative(engine, prompts, args) -> dict:
    clients = [int(c) for c in str(args.speculative_clients).split(",") if c.strip()]
    return speculative.measure(engine, prompts, args.max_tokens, clients=clients, repeat=max(1, args.repeat))


def _peak_mem() -> dict:
    out = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_engine(args):
    from coolfusion.config import load_config
    from coolfusion.engine.engine import Engine
    from coolfusion.runtime.loading import load

    if args.shapes:
        return Engine.from_models(_shaped_models(args))
    cfg = load_config(args.config)
    if args.random_weights:
        return Engine.from_models([load(m, random_weights=True, seed=i) for i, m in enumerate(cfg.models)], cfg.fusion)
    return Engine.from_config(cfg)


def _shaped_models(args):
    from transformers import AutoConfig, AutoTokenizer

    from coolfusion.runtime.loading import LoadedModel, random_model

    names = [s.strip() for s in args.shapes.split(",")]
    toks = [t.strip() for t in (args.tokenizers or "").split(",") if t.strip()]
    if not toks:
        raise SystemExit("--shapes needs --tokenizers (saved tokenizer directories)")
    models = []
    for i, name in enumerate(names):
        shape = dict(SHAPES[name])
        arch = shape.pop("arch")
        tok = AutoTokenizer.from_pretrained(toks[i % len(toks)])
        cfg = AutoConfig.for_model(arch, vocab_size=len(tok), max_position_embeddings=8192,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.eos_token_id, **shape)
        device = torch.device(args.device)
        models.append(LoadedModel(name, random_model(cfg, device, i), tok, device))
    return models


def _hf_alone(worker, prompts, n) -> dict:
    chars = toks = 0
    t = 0.0
    for prompt in prompts:
        ids = torch.tensor([worker.text.encode(prompt, special=True)], device=worker.device)
        _sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = worker.runner.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               pad_token_id=worker.text.primary_end)
        _sync()
        t += time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        toks += len(new)
        chars += len(worker.text.decode(new))
    return {"seconds": t, "chars": chars, "tokens": toks, "chars_per_s": chars / t, "tokens_per_s": toks / t}


def _engine_run(engine, model, prompts, n) -> dict:
    from coolfusion.core.types import GenerationRequest

    tok0 = {w.name: (w.tok_seconds, w.forward_tokens) for w in engine.workers}
    chars = toks = steps = agreed = 0
    texts = []
    timings = {"propose": 0.0, "score": 0.0, "commit": 0.0}
    t = 0.0
    for prompt in prompts:
        req = GenerationRequest(prompt=prompt, model=model, max_tokens=n)
        _sync()
        t0 = time.perf_counter()
        text, last = "", None
        gen = engine.start(req)
        for step in gen:
            text += step.text
            last = step
        _sync()
        t += time.perf_counter() - t0
        chars += len(text)
        texts.append(text)
        toks += last.completion_tokens
        steps += gen.stats.steps
        agreed += gen.stats.agreed
        for k in timings:
            timings[k] += getattr(gen.stats, f"{k}_s")
    tok_s = sum(w.tok_seconds - tok0[w.name][0] for w in engine.workers)
    fwd = sum(w.forward_tokens - tok0[w.name][1] for w in engine.workers)
    per = max(steps, 1)
    return {
        "seconds": t, "chars": chars, "tokens": toks, "chars_per_s": chars / t, "tokens_per_s": toks / t,
        "steps": steps, "segments_per_request": steps / len(prompts), "agreement_rate": agreed / per,
        "ms_per_step": {**{k: 1000 * v / per for k, v in timings.items()}, "tokenizer": 1000 * tok_s / per,
                        "total": 1000 * t / per},
        "forward_tokens_per_output_token": fwd / max(toks, 1), "texts": texts,
    }


def _step_time_at(engine, context_tokens: int, steps: int) -> tuple[float, float]:
    """Fused ms per step with a prompt of about `context_tokens` reference tokens, and the
    tokens fed through the models per step (the work a step did: compare like with like)."""
    from coolfusion.core.types import GenerationRequest

    ref = engine.workers[0].text
    filler = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills. " * 400)
    ids, starts = ref.encode_with_starts(filler)
    prompt = filler[: starts[min(context_tokens, len(ids) - 1)]] + "\nIn summary,"
    room = min(w.context_limit or 10**6 for w in engine.workers) - 2 * len(ids[:context_tokens]) - 64
    gen = engine.start(GenerationRequest(prompt=prompt, max_tokens=max(room, 1)))
    next(gen)  # prefill and first step, not timed
    fed = sum(w.forward_tokens for w in engine.workers)
    _sync()
    t0 = time.perf_counter()
    done = 0
    for _ in range(steps):
        step = next(gen, None)
        if step is None or step.finish_reason is not None:
            break
        done += 1
    _sync()
    dt = time.perf_counter() - t0
    fed = sum(w.forward_tokens for w in engine.workers) - fed
    gen.close()
    return 1000 * dt / max(done, 1), fed / max(done, 1)


def _ray_overhead(args, prompts, n, local: dict) -> dict:
    """(c) again with one Ray actor per model; overhead = master round trips minus actor time."""
    from coolfusion.config import load_config
    from coolfusion.engine.engine import Engine
    from coolfusion.workers.ray_proxy import ray_config
    from coolfusion.core.types import COOL

    engine = Engine.from_config(ray_config(load_config(args.config), address="local"))
    try:
        _engine_run(engine, COOL, prompts[:1], 8)  # warm-up
        for w in engine.workers:
            w.reset_stats()
        r = _engine_run(engine, COOL, prompts, n)
        overhead = sum(v["overhead_s"] for w in engine.workers for v in w.call_stats().values())
        per = max(r["steps"], 1)
        r["ray_overhead_ms_per_step"] = 1000 * overhead / per
        r["local_ms_per_step"] = local["ms_per_step"]["total"]
        return r
    finally:
        engine.close()


def _ray_concurrency(args, levels, ids, local: dict) -> dict:
    """The concurrency levels again with backend: ray (the config's fusion settings) on a local
    Ray cluster; every output is compared with the local backend's solo output."""
    from coolfusion.bench import concurrency
    from coolfusion.config import load_config
    from coolfusion.engine.engine import Engine
    from coolfusion.workers.ray_proxy import ray_config

    reference = next(r["solo"] for r in (local.get("batching_on"), local.get("batching_off")) if r)
    engine = Engine.from_config(ray_config(load_config(args.config), address="local"))
    try:
        res = concurrency.measure(engine, levels, args.max_tokens, ids, reference=reference)
    finally:
        engine.close()
    print(f"\nbackend: ray (fusion.batching: {engine.fusion.batching}), identical = equal to the local backend's solo output")
    concurrency.print_table(res)
    return res


def measure(engine, prompts, n, *, skip_hf=False, growth_steps=12, growth_repeats=3) -> dict:
    """All figures of one benchmark run over a loaded engine (see the module docstring)."""
    from coolfusion.core.types import COOL

    _engine_run(engine, COOL, prompts[:1], 8)  # warm-up: first calls allocate, fill caches
    res = {"device": str(engine.workers[0].device), "torch": torch.__version__, "models": engine.source_names,
           "max_tokens": n, "prompts": len(prompts), "hf_generate": {}, "engine_alone": {}}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
    if not skip_hf:
        for w in engine.workers:
            res["hf_generate"][w.name] = _hf_alone(w, prompts, n)
    for w in engine.workers:
        res["engine_alone"][w.name] = _engine_run(engine, w.name, prompts, n)
    res["cool_fusion"] = _engine_run(engine, COOL, prompts, n)

    base = res["hf_generate"] or res["engine_alone"]
    rates = [base[w]["chars_per_s"] for w in engine.source_names]
    floor_one = 1.0 / sum(1.0 / r for r in rates)
    floor_many = min(rates)
    fused = res["cool_fusion"]["chars_per_s"]
    res["floor_one_device_chars_per_s"] = floor_one
    res["floor_device_per_model_chars_per_s"] = floor_many
    res["fused_vs_floor"] = fused / floor_one
    res["fused_vs_floor_device_per_model"] = fused / floor_many
    # the fused text priced in each model's own tokens at its (a) tokens/s
    texts = res["cool_fusion"]["texts"]
    res["fused_text_tokens"] = {w.name: sum(len(w.text.encode(t)) for t in texts) for w in engine.workers}
    res["fused_text_chars_per_token"] = {v: res["cool_fusion"]["chars"] / max(k, 1)
                                         for v, k in res["fused_text_tokens"].items()}
    floor_s = sum(k / base[v]["tokens_per_s"] for v, k in res["fused_text_tokens"].items())
    res["floor_tokens_one_device_seconds"] = floor_s
    res["fused_vs_floor_tokens"] = floor_s / res["cool_fusion"]["seconds"]

    times, fed = {100: [], 2000: []}, {100: [], 2000: []}
    for _ in range(max(1, growth_repeats)):  # interleaved, so both lengths share the noise
        for ctx in times:
            ms, tokens = _step_time_at(engine, ctx, growth_steps)
            times[ctx].append(ms)
            fed[ctx].append(tokens)
    res["ms_per_step_at_100_runs"], res["ms_per_step_at_2000_runs"] = times[100], times[2000]
    res["forward_tokens_per_step_at_100"] = statistics.mean(fed[100])
    res["forward_tokens_per_step_at_2000"] = statistics.mean(fed[2000])
    res["ms_per_step_at_100"] = statistics.median(times[100])
    res["ms_per_step_at_2000"] = statistics.median(times[2000])
    res["cost_growth"] = res["ms_per_step_at_2000"] / res["ms_per_step_at_100"]
    res["peak_memory"] = _peak_mem()
    return res


def run(args) -> int:
    t_load = time.perf_counter()
    engine = build_engine(args)
    load_s = time.perf_counter() - t_load
    if args.concurrency:
        from coolfusion.bench import concurrency


        levels = sorted({int(x) for x in args.concurrency.split(",")})
        ids = args.model_ids.split(",") if args.model_ids else None
        res = {"load_seconds": load_s}
        modes = ["off", "on"] if args.batching == "both" else [args.batching]
        engines = {mode: concurrency.with_runner(engine, batching=mode == "on") for mode in modes}
        for mode, eng in engines.items():
            res[f"batching_{mode}"] = concurrency.measure(eng, levels, args.max_tokens, ids)
            print(f"\nfusion.batching: {mode}")
            concurrency.print_table(res[f"batching_{mode}"])
        if len(engines) == 2:  # one client, on against off, interleaved
            on = res["batching_on"]
            res["one_client_on_off"] = concurrency.one_client_on_off(
                engines["on"], engines["off"], list(on["models"]), args.max_tokens, max(levels), on["solo"],
                repeat=args.repeat)
            print()
            concurrency.print_on_against_off(res)
        for eng in engines.values():
            eng.close()
        if args.ray and not (args.shapes or args.random_weights):
            res["ray"] = _ray_concurrency(args, levels, ids, res)
        _write_json(args.json_path, res)
        return 0
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]
    if args.speculative == "only":
        res = {"load_seconds": load_s, "speculative": _speculative(engine, prompts, args)}
        speculative.print_table(res["speculative"])
        _write_json(args.json_path, res)
        return 0
    res = measure(engine, prompts, args.max_tokens, skip_hf=args.skip_hf, growth_steps=args.growth_steps,
                  growth_repeats=args.growth_repeats)
    res["load_seconds"] = load_s
    if args.ray and not (args.shapes or args.random_weights):
        res["ray"] = _ray_overhead(args, prompts, args.max_tokens, res["cool_fusion"])
    _print(res, engine.source_names)
    if args.speculative == "also":
        res["speculative"] = _speculative(engine, prompts, args)
        speculative.print_table(res["speculative"])
    _write_json(args.json_path, res)
    return 0


def _write_json(path: str | None, res: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=2))
        print(f"\nwrote {path}")


def _print(res, names) -> None:
    print(f"device: {res.get('gpu', res['device'])}  torch {res['torch']}  prompts: {res['prompts']}  "
          f"max_tokens: {res['max_tokens']}  load: {res['load_seconds']:.1f}s")
    rows = []
    for name in names:
        if name in res["hf_generate"]:
            rows.append((f"(a) {name} transformers generate", res["hf_generate"][name]))
    for name in names:
        rows.append((f"(b) {name} engine alone", res["engine_alone"][name]))
    rows.append(("(c) cool-fusion", res["cool_fusion"]))
    print(f"{'run':46} {'chars/s':>8} {'tok/s':>7} {'steps/req':>9} {'agree':>6} "
          f"{'ms/step: propose':>16} {'score':>6} {'commit':>6} {'tokzr':>6} {'total':>6}")
    for label, r in rows:
        ms = r.get("ms_per_step")
        extra = (f"{r['segments_per_request']:9.1f} {r['agreement_rate']:6.2f} {ms['propose']:16.1f} "
                 f"{ms['score']:6.1f} {ms['commit']:6.1f} {ms['tokenizer']:6.1f} {ms['total']:6.1f}") if ms else ""
        print(f"{label:46} {r['chars_per_s']:8.1f} {r['tokens_per_s']:7.1f} {extra}")
    print(f"floor, one device: {res['floor_one_device_chars_per_s']:.1f} chars/s   "
          f"fused_vs_floor: {res['fused_vs_floor']:.2f}")
    print(f"floor, one device per model: {res['floor_device_per_model_chars_per_s']:.1f} chars/s   "
          f"fused_vs_floor_device_per_model: {res['fused_vs_floor_device_per_model']:.2f}")
    alone = res["hf_generate"] or res["engine_alone"]
    cpt = "  ".join(f"{v} alone {alone[v]['chars'] / max(alone[v]['tokens'], 1):.2f}, fused text "
                    f"{res['fused_text_chars_per_token'][v]:.2f}" for v in names)
    print(f"chars per token: {cpt}")
    print(f"floor for the fused text (each model decodes its tokens of it), one device: "
          f"{res['floor_tokens_one_device_seconds']:.1f} s   fused: {res['cool_fusion']['seconds']:.1f} s   "
          f"fused_vs_floor_tokens: {res['fused_vs_floor_tokens']:.2f}")
    def runs(key):
        return " ".join(f"{x:.0f}" for x in res[key])

    print(f"fused ms/step at ~100 context tokens: {res['ms_per_step_at_100']:.1f}   at ~2000: "
          f"{res['ms_per_step_at_2000']:.1f}   cost_growth: {res['cost_growth']:.2f}   "
          f"(medians of [{runs('ms_per_step_at_100_runs')}] and [{runs('ms_per_step_at_2000_runs')}]; "
          f"tokens fed per step {res['forward_tokens_per_step_at_100']:.1f} and "
          f"{res['forward_tokens_per_step_at_2000']:.1f})")
    if "ray" in res:
        r = res["ray"]
        print(f"(c) cool-fusion, backend ray: {r['chars_per_s']:.1f} chars/s, {r['ms_per_step']['total']:.1f} ms/step "
              f"(local {r['local_ms_per_step']:.1f}); Ray overhead {r['ray_overhead_ms_per_step']:.1f} ms/step")
    print(f"peak memory: {json.dumps(res['peak_memory'])}")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="coolfusion bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""`coolfusion bench`'s speculative section: the same greedy requests with speculative
proposals off and on (docs/speculative.md), in one run over the same loaded models.

Per setting: model forwards per selected segment and model-busy seconds per segment (both
summed over the models, one request at a time, `fusion.batching` off), single-stream
characters/s (one request at a time, `fusion.batching` off), and the aggregate characters/s of
concurrent clients (8 by default; `--speculative-clients 1,2,4,8`) with `fusion.batching` on:
"on" as configured (a step speculates only while at most `fusion.speculative_max_requests`
requests generate, 1 by default), and "on, at any load" with every step speculating.
Single-stream figures are also given for every drafter choice (`fusion.drafter`). Every text
is compared with the plain one (`identical`).
"""

from __future__ import annotations

import time
from typing import Sequence

from coolfusion.bench import concurrency
from coolfusion.core.types import COOL, GenerationRequest

CLIENTS = 8


def _runners(engine):
    return [w.runner for w in engine.workers]


def single_stream(engine, prompts, max_tokens: int) -> dict:
    """One request at a time over `prompts`; forwards and busy seconds from the runners."""
    runners = _runners(engine)
    f0, b0 = [r.forwards for r in runners], [r.busy_s for r in runners]
    texts, steps, accepted, checked, seconds = [], 0, 0, 0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        gen = engine.start(GenerationRequest(prompt=prompt, model=COOL, max_tokens=max_tokens))
        text = ""
        for step in gen:
            text += step.text
            if step.speculation:
                accepted += sum(step.speculation["accepted"].values())
                checked += sum(step.speculation["checked"].values())
        seconds += time.perf_counter() - t0
        texts.append(text)
        steps += gen.stats.steps
    chars = sum(map(len, texts))
    per = max(steps, 1)
    return {"forwards_per_segment": sum(r.forwards - f for r, f in zip(runners, f0)) / per,
            "busy_s_per_segment": sum(r.busy_s - b for r, b in zip(runners, b0)) / per,
            "chars_per_s": chars / seconds, "segments": steps, "seconds": seconds, "chars": chars,
            "draft_tokens_checked": checked, "draft_tokens_accepted": accepted, "texts": texts}


def measure(engine, prompts, max_tokens: int, *, clients: Sequence[int] = (CLIENTS,), repeat: int = 1) -> dict:
    """{off: {...}, on: {...}, on_at_any_load: {...}, drafters: {rule: single-stream figures},
    default_drafter}; per client level c, `chars_per_s_{c}_clients` (the best of `repeat`
    runs, the settings interleaved) and `identical_{c}_clients` in off, on and on_at_any_load."""
    base = engine.fusion.model_copy(update={"batching": False})
    setting = {flag: engine.with_fusion(base.model_copy(update={"speculative": flag})) for flag in (False, True)}
    single_stream(setting[True], prompts[:1], 8)  # warm-up (and the drafter order's measurement)
    res: dict = {"prompts": len(prompts), "max_tokens": max_tokens, "clients": list(clients),
                 "default_drafter": base.drafter, "default_max_requests": base.speculative_max_requests,
                 "drafters": {}, "on_at_any_load": {}}
    for flag, name in ((False, "off"), (True, "on")):
        res[name] = single_stream(setting[flag], prompts, max_tokens)
    plain = res["off"]["texts"]
    for rule in ("fastest", "winner", *engine.source_names):
        eng = engine.with_fusion(base.model_copy(update={"speculative": True, "drafter": rule}))
        single_stream(eng, prompts[:1], 8)  # warm-up, as for "on": the rows compare like with like
        res["drafters"][rule] = single_stream(eng, prompts, max_tokens)
        res["drafters"][rule]["identical"] = res["drafters"][rule].pop("texts") == plain
        eng.close()
    res["on"]["identical"] = res["on"]["texts"] == plain
    slots = max(max(clients), base.kv_slots)
    concurrent = {name: engine.with_fusion(base.model_copy(update={"speculative": flag, "batching": True,
                                                                   "kv_slots": slots, **gate}))
                  for flag, name, gate in ((False, "off", {}), (True, "on", {}),
                                           (True, "on_at_any_load", {"speculative_max_requests": max(clients)}))}
    for c in clients:
        solo = {i: plain[i % len(prompts)] for i in range(c)}
        for _ in range(repeat):
            for name, eng in concurrent.items():
                row = concurrency.level(eng, COOL, c, max_tokens, solo, prompts)
                key = _clients_key(c)
                if row["chars_per_s"] > res[name].get(key, 0.0):
                    res[name][key] = row["chars_per_s"]
                    res[name][f"mean_batch_{c}_clients"] = row["mean_batch"]
                    res[name][f"model_busy_{c}_clients"] = row["model_busy"]
                res[name][f"identical_{c}_clients"] = res[name].get(f"identical_{c}_clients", True) and row["identical"]
    for eng in (*concurrent.values(), *setting.values()):
        eng.close()
    for name in ("off", "on"):
        res[name].pop("texts", None)
    return res


def _clients_key(clients: int) -> str:
    return f"chars_per_s_{clients}_clients"


def print_table(res: dict) -> None:
    print(f"\nspeculative proposals: {res['prompts']} prompts x {res['max_tokens']} tokens, greedy cool-fusion; "
          f"default drafter {res['default_drafter']!r}")
    print(f"{'setting':24} {'fwd/segment':>11} {'busy s/seg':>10} {'chars/s':>8} {'accepted/checked':>17} "
          f"{'identical':>9}")
    rows = [("off", res["off"]), ("on", res["on"])] + [(f"on, drafter {k}", v) for k, v in res["drafters"].items()]
    for label, r in rows:
        drafts = f"{r['draft_tokens_accepted']}/{r['draft_tokens_checked']}"
        print(f"{label:24} {r['forwards_per_segment']:11.2f} {r['busy_s_per_segment']:10.3f} {r['chars_per_s']:8.1f} "
              f"{drafts:>17} {str(r.get('identical', True)):>9}")
    off, on, anyload = res["off"], res["on"], res["on_at_any_load"]
    print(f"\nconcurrent clients, batching on (aggregate chars/s; 'on' speculates while at most "
          f"{res['default_max_requests']} request(s) generate):")
    print(f"{'clients':>7} {'off':>8} {'on':>8} {'on, at any load':>16} {'on/off':>7} {'any/off':>8} "
          f"{'mean batch off/on/any':>22} {'models busy off | any':>22} {'identical':>9}")
    for c in res["clients"]:
        k = _clients_key(c)
        same = all(r[f"identical_{c}_clients"] for r in (off, on, anyload))
        batch = "/".join(f"{b:.1f}" if (b := r[f"mean_batch_{c}_clients"]) else "-" for r in (off, on, anyload))
        busy = " | ".join("/".join(f"{b:.0%}" for b in r[f"model_busy_{c}_clients"]) for r in (off, anyload))
        print(f"{c:7} {off[k]:8.1f} {on[k]:8.1f} {anyload[k]:16.1f} {on[k] / off[k]:6.2f}x {anyload[k] / off[k]:7.2f}x "
              f"{batch:>22} {busy:>22} {str(same):>9}")
    n = CLIENTS if CLIENTS in res["clients"] else res["clients"][-1]
    k8 = _clients_key(n)
    print(f"on vs off: forwards/segment {on['forwards_per_segment'] / off['forwards_per_segment'] - 1:+.0%}, "
          f"busy s/segment {on['busy_s_per_segment'] / off['busy_s_per_segment'] - 1:+.0%}, "
          f"single stream {on['chars_per_s'] / off['chars_per_s']:.2f}x, "
          f"{n} clients {on[k8] / off[k8]:.2f}x (speculating at any load {anyload[k8] / off[k8]:.2f}x)")

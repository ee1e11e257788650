"""`coolfusion bench`'s speculative section: the same greedy requests with speculative
proposals off and on (docs/speculative.md), in one run over the same loaded models.

Per setting: model forwards per selected segment and model-busy seconds per segment (both
summed over the models, one request at a time, `fusion.batching` off), single-stream
characters/s (one request at a time, `fusion.batching` off), and the aggregate characters/s of
8 concurrent clients with `fusion.batching` on: "on" as configured (a step speculates only
while at most `fusion.speculative_max_requests` requests generate, 1 by default), and "on, at
any load" with every step speculating. Single-stream figures are also given for every
drafter choice (`fusion.drafter`). Every text is compared with the plain one (`identical`).
"""

from __future__ import annotations

import time

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


def measure(engine, prompts, max_tokens: int, *, clients: int = CLIENTS) -> dict:
    """{off: {...}, on: {...}, drafters: {rule: single-stream figures}, default_drafter}."""
    base = engine.fusion.model_copy(update={"batching": False})
    setting = {flag: engine.with_fusion(base.model_copy(update={"speculative": flag})) for flag in (False, True)}
    single_stream(setting[True], prompts[:1], 8)  # warm-up (and the drafter order's measurement)
    res: dict = {"prompts": len(prompts), "max_tokens": max_tokens, "clients": clients,
                 "default_drafter": base.drafter, "drafters": {}}
    for flag, name in ((False, "off"), (True, "on")):
        res[name] = single_stream(setting[flag], prompts, max_tokens)
    plain = res["off"]["texts"]
    for rule in ("fastest", "winner", *engine.source_names):
        eng = engine.with_fusion(base.model_copy(update={"speculative": True, "drafter": rule}))
        res["drafters"][rule] = single_stream(eng, prompts, max_tokens)
        res["drafters"][rule]["identical"] = res["drafters"][rule].pop("texts") == plain
        eng.close()
    res["on"]["identical"] = res["on"]["texts"] == plain
    solo = {i: plain[i % len(prompts)] for i in range(clients)}
    key = _clients_key(clients)
    res["on_at_any_load"] = {}
    for flag, name, gate in ((False, "off", {}), (True, "on", {}),
                             (True, "on_at_any_load", {"speculative_max_requests": clients})):
        eng = engine.with_fusion(base.model_copy(update={"speculative": flag, "batching": True,
                                                        "kv_slots": max(clients, base.kv_slots), **gate}))
        row = concurrency.level(eng, COOL, clients, max_tokens, solo, prompts)
        res[name][key] = row["chars_per_s"]
        res[name]["identical_8_clients"] = row["identical"]
        eng.close()
    for name in ("off", "on"):
        res[name].pop("texts", None)
    for eng in setting.values():
        eng.close()
    return res


def _clients_key(clients: int) -> str:
    return "chars_per_s_8_clients" if clients == 8 else f"chars_per_s_{clients}_clients"


def print_table(res: dict) -> None:
    print(f"\nspeculative proposals: {res['prompts']} prompts x {res['max_tokens']} tokens, greedy cool-fusion; "
          f"default drafter {res['default_drafter']!r}")
    print(f"{'setting':22} {'fwd/segment':>11} {'busy s/seg':>10} {'chars/s':>8} {'accepted/checked':>17} "
          f"{'chars/s ' + str(res['clients']) + ' clients':>17} {'identical':>9}")
    key = _clients_key(res["clients"])
    rows = [("off", res["off"]), ("on", res["on"])] + [(f"on, drafter {k}", v) for k, v in res["drafters"].items()]
    for label, r in rows:
        many = f"{r[key]:17.1f}" if key in r else f"{'-':>17}"
        same = r.get("identical", True) and r.get("identical_8_clients", True)
        print(f"{label:22} {r['forwards_per_segment']:11.2f} {r['busy_s_per_segment']:10.3f} {r['chars_per_s']:8.1f} "
              f"{str(r['draft_tokens_accepted']) + '/' + str(r['draft_tokens_checked']):>17} {many} {str(same):>9}")
    anyload = res["on_at_any_load"]
    print(f"{'on, at any load':22} {'-':>11} {'-':>10} {'-':>8} {'-':>17} {anyload[key]:17.1f} "
          f"{str(anyload['identical_8_clients']):>9}")
    off, on = res["off"], res["on"]
    print(f"on vs off: forwards/segment {on['forwards_per_segment'] / off['forwards_per_segment'] - 1:+.0%}, "
          f"busy s/segment {on['busy_s_per_segment'] / off['busy_s_per_segment'] - 1:+.0%}, "
          f"single stream {on['chars_per_s'] / off['chars_per_s']:.2f}x, "
          f"{res['clients']} clients {on[key] / off[key]:.2f}x (speculating at any load {anyload[key] / off[key]:.2f}x)")

"""Cool-Fusion server: training-free fusion of heterogeneous causal LMs behind an
OpenAI-compatible HTTP API. The sub-packages are the layers (docs/architecture.md):

    core/       the method, no torch: request types, checks, word starts, chat templates,
                the loop, selection rules, output
    workers/    the paper's Table 1 contract, the tokenizer side, local and Ray workers
    runtime/    torch and transformers: loading, runners, KV storage, batched forward, log-probs
    engine/     orchestration of a request over the workers; log-likelihoods
    server/     HTTP only (FastAPI): routes, SSE, errors, admission, CLI
    evaluation/, bench/   clients of the public API
    config.py   config.yaml's schema: every key once, with its default and description
    config_doc.py   docs/configuration.md, generated from that schema
    extras.py   the optional extras (eval, bench, ray): importing one names its pip command

The engine knows nothing about HTTP:

    from coolfusion.config import load_config
    from coolfusion.engine import Engine
    from coolfusion.core.types import GenerationRequest

    engine = Engine.from_config(load_config("config.yaml"))
    for step in engine.generate(GenerationRequest(prompt="The capital of France is")):
        print(step.text, end="")
"""

"""Cool-Fusion engine: training-free fusion of heterogeneous causal LMs (no HTTP here).

    from fusion.config import load_config
    from fusion.engine import Engine
    from fusion.types import GenerationRequest

    engine = Engine.from_config(load_config("config.yaml"))
    for step in engine.generate(GenerationRequest(prompt="The capital of France is")):
        print(step.text, end="")
"""

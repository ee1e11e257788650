"""Orchestration of a request over the workers (engine.py), the protocol the HTTP layer
sees it through (client.py), and log-likelihoods for logprobs/echo (likelihood.py).
`Engine` is imported lazily: `coolfusion.engine.client` stays free of torch."""

__all__ = ["Engine", "Generation"]


def __getattr__(name: str):
    if name in __all__:
        from coolfusion.engine import engine

        return getattr(engine, name)
    raise AttributeError(name)

"""Orchestration of a request over the workers (engine.py) and log-likelihoods for
logprobs/echo (likelihood.py)."""

from coolfusion.engine.engine import Engine, Generation

__all__ = ["Engine", "Generation"]

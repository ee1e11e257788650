"""What differs between the transformers versions we run on (4.56 to 5.x), in one place:
the text part of a (possibly multimodal) model config, and the name of the forward's cache
argument."""

from __future__ import annotations

import inspect


def text_config(config):
    """The text model's config (`get_text_config()` where a config has one, else itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def cache_keyword(model) -> str:
    """The forward's KV-cache argument: transformers 5.2x renamed `past_key_values` to `cache`."""
    params = inspect.signature(getattr(model, "forward", model)).parameters
    return "cache" if "cache" in params else "past_key_values"

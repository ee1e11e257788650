"""The engine as the HTTP layer sees it: the `EngineClient` protocol.

`coolfusion.server` depends on this protocol only (as vLLM's routes see an `EngineClient`),
never on `Engine` itself; `coolfusion.engine.Engine` implements it, and so does the small fake
engine of the HTTP-only tests (tests/fakes.py); a test checks both. `check` returns a
`Checked` request: every check passed and each participating model's prompt rendered and
tokenized once, so that `generate(checked)` does not do that work again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

from coolfusion.core.types import GenerationRequest, Step


@dataclass(frozen=True)
class Checked:
    """A request that passed every check, with its defaults resolved (`max_tokens`, a
    token-id prompt's text) and each participating model's prompt tokens (model name ->
    ids; its own chat template for a chat request)."""

    request: GenerationRequest
    prompt_ids: dict[str, list[int]] = field(default_factory=dict)
    prompt_tokens: int = 0  # in the reference tokenizer: what `usage` and max_tokens count


@runtime_checkable
class EngineClient(Protocol):
    @property
    def default_max_tokens(self) -> int: ...  # a request without max_tokens gets this many

    @property
    def active_requests(self) -> int: ...  # generations running now

    @property
    def unavailable(self) -> str | None: ...  # why it cannot serve now (/health and 503s say it); None: ready

    def model_ids(self) -> list[str]: ...  # the fused variants, then every source model

    def kv_report(self) -> dict[str, dict[str, int]]: ...  # per model with KV slots: slots, in use, bytes

    def check(self, req: GenerationRequest | Checked, where: str = "prompt") -> Checked: ...  # raises the typed 4xx

    def generate(self, req: GenerationRequest | Checked,
                 cancel: threading.Event | None = None) -> Iterator[Step]: ...  # one Step per segment

    def close(self) -> None: ...  # release every model's resources

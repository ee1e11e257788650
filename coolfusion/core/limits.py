"""The request limits, in one table shared by the engine's checks and the HTTP schemas.

`coolfusion.core.validation` enforces them on every `GenerationRequest`; `coolfusion.server.schemas`
builds its pydantic field bounds from the same names, so a limit cannot differ between the
engine and the API (docs/architecture.md, "Limits and defaults").
"""

from __future__ import annotations

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0  # inclusive
TOP_P_MIN, TOP_P_MAX = 0.0, 1.0  # exclusive below, inclusive above: (0, 1]
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as OpenAI clients send it
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one HTTP request
ROLES = ("system", "user", "assistant")  # roles the engine renders (the API maps developer -> system)
MAX_LOGPROBS = 5  # top alternatives per token on /v1/completions (OpenAI's legacy limit)
MAX_TOP_LOGPROBS = 20  # top alternatives per token on /v1/chat/completions (OpenAI's limit)
MAX_FUSED_LOGPROBS = 1  # for the fused ids: each alternative may cost a fused step (coolfusion.engine.alternatives)

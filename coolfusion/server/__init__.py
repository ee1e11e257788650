"""The HTTP layer of Cool-Fusion: OpenAI-compatible routes, SSE, errors, auth, limits, CLI.

It imports the engine (coolfusion/) and knows it only through its public interface
(model_ids, check, generate, active_requests); coolfusion/ never imports this package.
Start from `coolfusion.server.app.create_app`.
"""

from coolfusion.server.app import app_state, create_app

__all__ = ["app_state", "create_app"]

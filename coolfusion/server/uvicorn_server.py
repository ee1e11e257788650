"""Running an app under uvicorn with a graceful shutdown.

`GracefulServer` drains the app before uvicorn's own shutdown: it stops listening, refuses
new requests (503), lets running generations finish for the app's grace period, then
cancels the rest, so every open stream ends with an in-band error and `data: [DONE]`
instead of being cut. uvicorn's `timeout_graceful_shutdown` is a backstop beyond that.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from coolfusion.server.app import app_state


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._fusion_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting; uvicorn closes them again (idempotent)
        await app_state(self._fusion_app).drain()
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str, port: int, *, log_level: str = "info") -> GracefulServer:
    grace = app_state(app).settings.shutdown_grace_s
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # logging is configured by coolfusion.server.logs
        log_level=log_level,
        access_log=False,  # RequestContext writes one line per request
        lifespan="on",
        timeout_graceful_shutdown=int(grace) + 5,
    )
    return GracefulServer(config, app)

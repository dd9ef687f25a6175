"""GET /_/health over HTTP, in the spec's shape: {"status", "backend", "uptime_seconds"}.

503 with status "unhealthy" when etcd does not answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from controller.etcd import EtcdUnavailable


class HealthEndpoint:
    def __init__(self, check_etcd: Callable[[], Awaitable[object]],
                 backends: Callable[[], list[str]]) -> None:
        self.check_etcd = check_etcd
        self.backends = backends
        self.started = time.monotonic()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body: dict[str, object] = {
            "status": "healthy",
            "backend": ",".join(self.backends()) or "none",
            "uptime_seconds": int(time.monotonic() - self.started),
        }
        try:
            await self.check_etcd()
        except (EtcdUnavailable, OSError) as exc:
            body["status"] = "unhealthy"
            body["detail"] = f"etcd is unreachable: {exc}"
            return web.json_response(body, status=503)
        return web.json_response(body)

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        app = web.Application()
        app.router.add_get("/_/health", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host or "127.0.0.1", int(port)).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

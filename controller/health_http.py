"""The controller's HTTP port: GET /_/health and GET /metrics.

/_/health answers in the spec's shape, {"status", "backend", "uptime_seconds"}: 503 with
status "unhealthy" when etcd does not answer.

/metrics serves the controller's Prometheus registry (controller/telemetry.py and the
scrape-time collector of controller/metrics.py), in the text format or OpenMetrics as the
scraper asks, gzip-compressed when it accepts that. A scrape of a large fleet takes a few
hundred milliseconds of CPU, so it runs in a thread, not on the event loop: the collectors
copy the containers they read before reading them (controller/metrics.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from controller.etcd import EtcdUnavailable


class HealthEndpoint:
    def __init__(self, check_etcd: Callable[[], Awaitable[object]],
                 backends: Callable[[], list[str]],
                 metrics: Collector | None = None) -> None:
        self.check_etcd = check_etcd
        self.backends = backends
        self.metrics = metrics
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

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound(text="metrics are not served by this process\n")
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        text = await asyncio.to_thread(encoder, self.metrics)
        response = web.Response(body=text, headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        app = web.Application()
        app.router.add_get("/_/health", self.handle)
        app.router.add_get("/metrics", self.handle_metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host or "127.0.0.1", int(port)).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

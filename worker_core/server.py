"""HealthServer: the HTTP endpoints beside a running worker, on aiohttp.

``/healthz`` (liveness: 200 unless the claim loop is stuck or the worker stopped),
``/readyz`` (readiness: 200 only when the database answers and the worker is
running and not draining, else 503), ``/health`` (the full ``HealthReport`` as
JSON: 503 when unhealthy) and ``/metrics`` (Prometheus text; each scrape first
refreshes queue depth, the oldest ready job's age and table hygiene from the
database within a short timeout). aiohttp is imported when the server starts, so
``import worker_core`` stays light; prometheus-client is needed only when a
``registry`` is given.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .health import HealthStatus, HealthThresholds, check_database, check_loop, check_worker
from .logs import StructuredLogger
from .redact import redact_text

if TYPE_CHECKING:
    from .metrics import MetricsCollector
    from .snapshot import WorkerView

__all__ = ["HealthServer"]

_TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    """Serve ``/healthz``, ``/readyz``, ``/health`` and ``/metrics`` for ``worker``.

    Args:
        worker: a ``BaseWorker``, or any ``WorkerView`` (config, worker_id, metrics and
            a ``snapshot()``).
        host: the interface to bind (loopback by default: the endpoints are not
            authenticated; ``health.http_host`` sets it for a worker).
        port: the port; 0 picks a free one (read ``port`` after ``start()``).
        registry: a prometheus-client ``CollectorRegistry`` to serve at ``/metrics``
            (the worker's metrics are registered in it); by default the worker's
            metrics are rendered on their own, without prometheus-client.
        scrape_timeout: seconds a scrape may spend reading the database (default:
            ``min(1, health.database_timeout)``).
        thresholds: health thresholds (default: from the worker's config).
    """

    def __init__(
        self,
        worker: WorkerView,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        registry: Any = None,
        scrape_timeout: float | None = None,
        thresholds: HealthThresholds | None = None,
    ) -> None:
        self.worker = worker
        self.host = host
        self._requested_port = port
        self.registry = registry
        config = worker.config
        self.scrape_timeout = (
            min(1.0, config.health.database_timeout) if scrape_timeout is None else scrape_timeout
        )
        self.thresholds = thresholds or HealthThresholds.from_config(config)
        self._runner: Any = None
        self._port: int | None = None
        self._log = StructuredLogger("worker_core.health")

    @property
    def port(self) -> int:
        """The bound port (after ``start()``)."""
        if self._port is None:
            raise RuntimeError("the health server is not started")
        return self._port

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` socket addresses (after ``start()``)."""
        if self._runner is None:
            raise RuntimeError("the health server is not started")
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    def _collector(self) -> MetricsCollector:
        return self.worker.metrics.collector(worker=self.worker)

    async def start(self) -> None:
        """Bind and serve; raises ``OSError`` when the port is taken."""
        if self._runner is not None:
            return
        from aiohttp import web

        if self.registry is not None:
            from .metrics import register_metrics

            register_metrics(self.worker.metrics, self.registry, worker=self.worker)
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._log.info("health server listening", host=self.host, port=self._port)

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ------------------------------------------------------------------
    def _json(self, data: dict[str, Any], ok: bool) -> Any:
        from aiohttp import web

        return web.Response(
            text=json.dumps(data, default=str),
            status=200 if ok else 503,
            content_type="application/json",
        )

    def _failure(self, exc: Exception) -> Any:
        error = redact_text(f"{type(exc).__name__}: {exc}", self.worker.config.secrets())
        self._log.warning("health endpoint failed", error=error)
        return self._json({"status": "unhealthy", "error": error[:500]}, ok=False)

    async def _healthz(self, request: Any) -> Any:
        try:
            loop = check_loop(
                self.worker.snapshot(), self.worker.config, thresholds=self.thresholds
            )
        except Exception as exc:
            return self._failure(exc)
        return self._json(
            {"status": loop.status.value, "detail": loop.detail},
            ok=loop.status is not HealthStatus.UNHEALTHY,
        )

    async def _readyz(self, request: Any) -> Any:
        snapshot = self.worker.snapshot()
        try:
            if not snapshot.running or snapshot.draining:
                reason = "draining" if snapshot.running else "not running"
                return self._json({"ready": False, "reason": reason}, ok=False)
            database = await check_database(
                self.worker.config, snapshot.queue, hygiene=False, thresholds=self.thresholds
            )
        except Exception as exc:
            return self._failure(exc)
        ready = database.status is not HealthStatus.UNHEALTHY
        body: dict[str, Any] = {"ready": ready, "database": database.to_dict()}
        if not ready:
            body["reason"] = "database unreachable"
        return self._json(body, ok=ready)

    async def _health(self, request: Any) -> Any:
        try:
            report = await check_worker(self.worker, thresholds=self.thresholds)
        except Exception as exc:
            return self._failure(exc)
        return self._json(report.to_dict(), ok=report.status is not HealthStatus.UNHEALTHY)

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        collector = self._collector()
        await collector.refresh(timeout=self.scrape_timeout)
        if self.registry is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body, content_type = generate_latest(self.registry), CONTENT_TYPE_LATEST
        else:
            body, content_type = collector.render().encode(), _TEXT_FORMAT
        return web.Response(body=body, headers={"Content-Type": content_type})

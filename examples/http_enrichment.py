"""A worker that calls an external HTTP API: invoices are converted to euros with an
exchange-rate service, through the worker's circuit breaker and rate limit.

A 429 with Retry-After becomes a ``RetryableError`` (the job is deferred and keeps
its attempt), a 5xx a ``TransientError`` (retried with backoff, counted by the
breaker), an unknown currency a ``PermanentError`` (dead letter). Built only on
``worker_core``'s public API and aiohttp.

Without RATES_URL a local stand-in API is started that answers 429 and 503 now
and then, so the retries and deferrals can be watched.

    python examples/http_enrichment.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import aiohttp
from aiohttp import web

from worker_core import (
    BaseWorker,
    PermanentError,
    Queue,
    RetryableError,
    StageContext,
    TransientError,
    WorkerConfig,
)


class FetchRate:
    name = "fetch_rate"
    timeout = 10.0

    def __init__(self, worker: EnrichmentWorker) -> None:
        self.worker = worker

    async def run(self, ctx: StageContext) -> None:
        currency = ctx.job.payload.get("currency")
        if not isinstance(currency, str):
            raise PermanentError("payload needs a 'currency' string", field="currency")
        bucket = ctx.rate_limiter("rates")
        if bucket is not None:
            await bucket.acquire()  # shared by every job of this worker; holds no connection
        rate = await ctx.breaker("rates").call(self.get_rate, currency, ctx.job.correlation_id)
        ctx.state["rate"] = rate

    async def get_rate(self, currency: str, correlation_id: str) -> float:
        url = f"{self.worker.rates_url}/rates/{currency}"
        async with self.worker.session.get(url, headers={"X-Correlation-ID": correlation_id}) as r:
            if r.status == 429:
                raise RetryableError("rate limited", retry_after=float(r.headers["Retry-After"]))
            if r.status == 404:
                raise PermanentError(f"unknown currency {currency!r}", currency=currency)
            if r.status >= 500:
                raise TransientError(f"rates service answered {r.status}", status=r.status)
            body: dict[str, Any] = await r.json()
            return float(body["rate"])


class Convert:
    name = "convert"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["eur"] = round(float(ctx.job.payload["amount"]) * ctx.state["rate"], 2)


class EnrichmentWorker(BaseWorker):
    rates_url = ""
    session: aiohttp.ClientSession

    def stages(self) -> list[FetchRate | Convert]:
        return [FetchRate(self), Convert()]

    async def on_startup(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def on_shutdown(self) -> None:
        await self.session.close()


async def stand_in_api() -> tuple[web.AppRunner, str]:
    """A flaky exchange-rate API on 127.0.0.1: every 4th answer is 429, every 7th 503."""
    rates = {"USD": 0.92, "GBP": 1.17, "CHF": 1.05}
    counter = itertools.count(1)

    async def rate(request: web.Request) -> web.Response:
        n = next(counter)
        if n % 4 == 0:
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": "0.2"}
            )
        if n % 7 == 0:
            return web.json_response({"error": "try later"}, status=503)
        currency = request.match_info["currency"]
        if currency not in rates:
            return web.json_response({"error": "unknown"}, status=404)
        return web.json_response({"currency": currency, "rate": rates[currency]})

    app = web.Application()
    app.router.add_get("/rates/{currency}", rate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def main(dsn: str) -> None:
    runner, url = (
        (None, os.environ["RATES_URL"]) if "RATES_URL" in os.environ else await stand_in_api()
    )
    config = WorkerConfig.model_validate({
        "database": {"dsn": dsn, "schema": "example_http"},
        # Retries and Retry-After stay within one poll interval, so run(until_empty=True)
        # waits for them instead of returning with jobs still due.
        "queue": {"name": "invoices", "concurrency": 4, "poll_interval": 0.3},
        "retry": {"base_delay": 0.05, "max_delay": 0.2},
        "rate_limits": {"rates": {"rate": 50, "burst": 5}},
        "circuit_breaker": {"fail_max": 5, "reset_timeout": 1},
    })  # fmt: skip
    invoices = [
        {"invoice": i, "amount": 100 + i, "currency": c}
        for i, c in enumerate(["USD", "GBP", "CHF"] * 6)
    ]
    invoices.append({"invoice": 99, "amount": 5, "currency": "XYZ"})
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            ids = await queue.enqueue_many(invoices)
        worker = EnrichmentWorker(config)
        worker.rates_url = url
        await worker.run(until_empty=True)
        async with Queue(config) as queue:
            jobs = [await queue.get(i) for i in ids]
    finally:
        if runner is not None:
            await runner.cleanup()
    done = [j for j in jobs if j is not None and j.status.value == "succeeded"]
    dead = [j for j in jobs if j is not None and j.status.value == "dead"]
    summary = worker.metrics.summary()
    first = done[0]
    print(f"{len(done)} invoices converted, e.g. {first.payload['amount']} "
          f"{first.payload['currency']} = {first.state['eur']} EUR")  # fmt: skip
    print(f"deferred (429): {summary['deferred']}, retried (503): {summary['retried']}, "
          f"dead: {len(dead)}")  # fmt: skip
    for job in dead:
        print(f"dead letter {job.id}: {job.last_error['message'] if job.last_error else '?'}")


if __name__ == "__main__":
    dsn = os.environ.get("WORKER_CORE_DATABASE__DSN")
    if dsn:
        asyncio.run(main(dsn))
    else:
        from worker_core.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as server:
            asyncio.run(main(server.dsn))

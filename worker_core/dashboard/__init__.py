"""The operations console: a live web dashboard over a worker_core schema.

``create_app(config)`` returns an aiohttp application (mount it in your own
server, or run it with ``serve`` / ``worker-core dashboard``). Pages: ``/``
overview (updated live over server-sent events), ``/jobs``, ``/jobs/{id}``,
``/dead``, ``/queues``, ``/workers``, ``/breakers``, ``/schedules``; JSON under
``/api/``. No front-end build step, no CDN: one small script and one stylesheet
ship with the package, charts are SVG drawn by the server. Security rules are in
``_security`` and ``_app`` (token, session cookie, CSRF, strict CSP, read-only).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._security import is_loopback_host

if TYPE_CHECKING:
    from aiohttp import web

    from worker_core.config import WorkerConfig
    from worker_core.queue import Queue

    from ._data import Schedules

__all__ = ["create_app", "serve"]


def create_app(
    config: WorkerConfig,
    *,
    read_only: bool = False,
    schedules: Schedules | None = None,
    queue: Queue | None = None,
) -> web.Application:
    """The dashboard as an aiohttp application.

    Args:
        config: the configuration (``database`` and ``dashboard`` sections).
        read_only: no action at all (also ``dashboard.read_only``).
        schedules: an async callable returning the schedules page's rows (``name``,
            ``cron``, ``next_run``, ``queue``, ``kind``); none by default.
        queue: an open ``Queue`` to read through (default: the application opens
            its own small pool, with ``dashboard.statement_timeout`` on every query).
    """
    from aiohttp import web

    from ._app import add_routes
    from ._guard import CONSOLE, Console, guard

    console = Console(
        config,
        read_only=read_only or config.dashboard.read_only,
        schedules=schedules,
        queue=queue,
    )
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[CONSOLE] = console
    app.on_startup.append(console.open)
    app.on_shutdown.append(console.shutdown)
    app.on_cleanup.append(console.close)
    add_routes(app)
    return app


def check_bind(host: str, config: WorkerConfig) -> None:
    """Refuse a non-loopback address without ``dashboard.token``."""
    if not is_loopback_host(host) and config.dashboard.token is None:
        raise PermissionError(
            f"refusing to serve the dashboard on {host!r} without dashboard.token: set "
            "WORKER_CORE_DASHBOARD__TOKEN (16+ characters) or bind 127.0.0.1"
        )


async def serve(
    config: WorkerConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    read_only: bool = False,
    ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the dashboard until SIGINT/SIGTERM (or ``stop`` is set).

    ``ready`` is called with the URL once it listens.
    """
    from aiohttp import web

    host = config.dashboard.host if host is None else host
    port = config.dashboard.port if port is None else port
    check_bind(host, config)
    app = create_app(config, read_only=read_only)
    # The allowed Host names also include the address it was asked to bind.
    from ._guard import CONSOLE

    app[CONSOLE].allowed_hosts.add(host.lower())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
        if ready is not None:
            ready(f"http://{shown}:{bound[1]}/")
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()

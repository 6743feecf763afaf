"""The runtime: everything one ``run()`` of a worker owns, created per run and dropped after.

It opens the pool (unless one was given) and the Queue, checks the schema, runs
``on_startup``, asks for the stage list, composes the completer, executor,
dispatcher, maintenance, notifier and stall watchdog, serves the health
endpoints when configured, handles SIGTERM/SIGINT, and undoes all of it in
order when the run ends. It is also what stages see through ``StageContext``
(``RunServices``): the pool, breakers, rate limiters and ``offload``.

Nothing here imports ``worker.py``: the façade hands over what a run needs as
plain values and callables (``RunParts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import multiprocessing
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor as PoolExecutor
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._completer import Completer
from ._dispatch import Dispatcher
from ._executor import Executor, Hooks
from ._maintenance import Maintenance
from ._notifier import Notifier, check_listen_target, listen_application_name
from ._watchdog import StallWatchdog
from .config import WorkerConfig
from .logs import StructuredLogger
from .metrics import ProcessingMetrics
from .queue import Queue, behind_pooler, open_pool
from .schedules import start_schedules, validate_schedules
from .snapshot import HealthCheck, WorkerSnapshot, WorkerView
from .sql import migrations
from .stages import validate_pipelines, validate_stages

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from .breaker import BreakerRegistry, CircuitBreaker
    from .console import WorkerConsole
    from .ratelimit import RateLimiter, RateLimiterRegistry
    from .server import HealthServer

__all__ = ["CORE_CONNECTIONS", "RunParts", "Runtime"]

#: How long a starting worker waits for its first LISTEN attempt before its first
#: reads (seconds): a bound only, the attempt takes milliseconds.
LISTEN_START_WAIT = 1.0
#: How long a stopping worker waits for its own tasks to end once cancelled (seconds).
CANCEL_WAIT = 10.0

T = TypeVar("T")

#: Connections the core itself may hold at once: claim, flush, heartbeat/rescue.
CORE_CONNECTIONS = 3


@dataclass(frozen=True, slots=True)
class RunParts:
    """What the façade hands one run: values, policies and hooks, never itself as a type."""

    worker: Any  # what stages see as ctx.worker
    view: WorkerView  # what the health server observes
    config: WorkerConfig
    worker_id: str
    metrics: ProcessingMetrics
    logger: StructuredLogger
    hooks: Hooks
    stages: Callable[[], Sequence[Any]]
    pipelines: Callable[[], Mapping[str, Sequence[Any]] | None]
    on_startup: Callable[[], Awaitable[None]]
    on_shutdown: Callable[[], Awaitable[None]]
    breakers: BreakerRegistry
    rate_limiter: Callable[[str], RateLimiter | None]
    limiters: RateLimiterRegistry
    schedules: Callable[[], Sequence[Any]]
    console: WorkerConsole
    required_breakers: tuple[str, ...]
    pool: AsyncConnectionPool | None
    rng: random.Random


class Runtime:
    """One run of a worker (``BaseWorker.run`` creates it; ``snapshot`` reads it)."""

    def __init__(self, parts: RunParts) -> None:
        self._parts = parts
        self._config = parts.config
        self._log = parts.logger
        self.running = False
        self.started_at: float | None = None
        self._pool: AsyncConnectionPool | None = None
        self.queue: Queue | None = None
        self._dispatcher: Dispatcher | None = None
        self._completer: Completer | None = None
        self._notifier: Notifier | None = None
        self._stop_requested = False
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None

    # -- RunServices: what stages use ----------------------------------------------------
    @property
    def logger(self) -> StructuredLogger:
        return self._log

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled autocommit connection for the duration of the block."""
        if self._pool is None:
            raise RuntimeError("the worker is not running: its connection pool is closed")
        async with self._pool.connection() as conn:
            yield conn

    def breaker(self, name: str) -> CircuitBreaker:
        return self._parts.breakers.get(name)

    def rate_limiter(self, name: str) -> RateLimiter | None:
        return self._parts.rate_limiter(name)

    async def offload(self, fn: Callable[..., T], /, *args: Any, process: bool = False) -> T:
        """``fn(*args)`` in the run's thread pool, or its process pool (``process=True``)."""
        loop = asyncio.get_running_loop()
        if process:
            pool = self._process_pool()
            try:
                return await loop.run_in_executor(pool, functools.partial(fn, *args))
            except BrokenProcessPool:
                # A child died (killed, out of memory): the pool is unusable; the next
                # call starts a fresh one, and this job retries like any transient error.
                if self._processes is pool:
                    self._processes = None
                    pool.shutdown(wait=False, cancel_futures=True)
                raise
        # The caller's context (job_id, stage for log lines) goes with the call.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self._thread_pool(), call)

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            workers = min(max(self._config.queue.concurrency, 4), 64)
            self._threads = ThreadPoolExecutor(workers, thread_name_prefix="worker_core.offload")
        return self._threads

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._processes is None:
            # forkserver: forking this multi-threaded process directly could copy a
            # held lock into the child; spawn where forkserver does not exist.
            methods = multiprocessing.get_all_start_methods()
            method = "forkserver" if "forkserver" in methods else "spawn"
            size = self._config.queue.offload_processes or os.cpu_count() or 1
            self._processes = ProcessPoolExecutor(
                size, mp_context=multiprocessing.get_context(method)
            )
        return self._processes

    @property
    def in_flight(self) -> int:
        return self._dispatcher.in_flight if self._dispatcher is not None else 0

    # -- control ------------------------------------------------------------------------
    def owns(self, task: asyncio.Task[Any] | None) -> bool:
        """``task`` is this run's main task or one of its jobs."""
        return task is not None and (
            task is self._task or (self._dispatcher is not None and self._dispatcher.owns(task))
        )

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._dispatcher is not None:
            self._dispatcher.request_stop()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def snapshot(
        self, breakers: Mapping[str, CircuitBreaker], checks: Mapping[str, HealthCheck]
    ) -> WorkerSnapshot:
        d, n = self._dispatcher, self._notifier
        return WorkerSnapshot(
            worker_id=self._parts.worker_id,
            running=self.running,
            draining=bool(d is not None and d.draining),
            started_at=self.started_at,
            last_loop_at=d.last_loop_at if d is not None else None,
            last_claim_at=d.last_claim_at if d is not None else None,
            in_flight=d.in_flight if d is not None else 0,
            buffered=d.buffered if d is not None else 0,
            concurrency=self._config.queue.concurrency,
            listener_connected=bool(n is not None and n.connected),
            listener_connects=n.connects if n is not None else 0,
            polling_only=bool(n is not None and not n.enabled),
            queue=self.queue if self.running else None,
            breakers=breakers,
            health_checks=checks,
        )

    # -- one run ----------------------------------------------------------------------
    async def run(self, until_empty: bool, *, install_signal_handlers: bool) -> None:
        parts, config = self._parts, self._config
        self.running = True
        self._task = asyncio.current_task()
        self.started_at = time.monotonic()
        background: list[asyncio.Task[Any]] = []
        restore_signals: Callable[[], None] = _nothing
        server: HealthServer | None = None
        watchdog: StallWatchdog | None = None
        started = False
        schedules = validate_schedules(parts.schedules())  # a bad entry fails before connecting
        handed: list[AsyncConnection[Any]] = []  # the pool's probe, kept to LISTEN on
        notifier: Notifier | None = None
        try:
            # First, so a SIGTERM while the worker is still connecting is a graceful
            # stop (exit 0) rather than the default death by signal.
            if install_signal_handlers:
                restore_signals = self._install_signal_handlers()
            pooled: list[bool] = []  # whether LISTEN would go through a pooler

            async def probe(conn: AsyncConnection[Any]) -> bool:
                """The pool's first connection, a probe: on the server LISTEN uses, it
                tells whether a pooler is in between, and it becomes the LISTEN
                connection (one backend start and authentication fewer)."""
                if config.listen_dsn() != config.dsn():
                    return False
                try:
                    if not await behind_pooler(conn):  # direct: session state stays
                        name = listen_application_name(config)
                        await conn.execute(
                            "SELECT set_config('application_name', %s, false)", (name,)
                        )
                        handed.append(conn)
                        pooled.append(False)
                        return True
                except Exception:
                    return False
                pooled.append(True)
                return False

            self._pool = parts.pool or await open_pool(
                config,
                max_size=max(
                    config.database.pool_max_size, config.queue.concurrency + CORE_CONNECTIONS
                ),
                probe=probe,
            )
            self.queue = queue = Queue(config, pool=self._pool)
            await self._check_schema(queue)
            listening = await check_listen_target(
                config, self._log, pooled=pooled[0] if pooled else None
            )
            # Attached from the first run on, so a breaker a stage creates later
            # already shares the fleet's state.
            await parts.breakers.attach(queue)
            await parts.limiters.attach(queue)
            await parts.on_startup()
            started = True
            # After on_startup: it may build clients. A worker with pipelines()
            # claims only the kinds it names; with stages(), jobs of every kind.
            pipelines = parts.pipelines()
            if pipelines is None:
                stages: list[Any] | None = validate_stages(parts.stages())
                by_kind: dict[str, list[Any]] | None = None
                kinds: list[str] | None = None
            else:
                stages, by_kind = None, validate_pipelines(pipelines)
                kinds = sorted(by_kind)
            parts.console.registry.kinds = kinds
            completer = self._completer = Completer(
                queue,
                flush_interval=config.queue.flush_interval,
                flush_max=config.queue.flush_max,
                metrics=parts.metrics,
                logger=self._log,
                worker_id=parts.worker_id,
                secrets=config.secrets(),
                rng=parts.rng,
            )
            executor = Executor(
                stages=stages, pipelines=by_kind, hooks=parts.hooks, config=config,
                metrics=parts.metrics, logger=self._log, completer=completer, services=self,
                worker=parts.worker, worker_id=parts.worker_id, rng=parts.rng,
                recorder=parts.console.recorder,
            )  # fmt: skip
            dispatcher = self._dispatcher = Dispatcher(
                queue=queue, completer=completer, executor=executor, config=config,
                metrics=parts.metrics, logger=self._log, worker_id=parts.worker_id,
                paused_for=self._paused_for, kinds=kinds,
            )  # fmt: skip
            if self._stop_requested:
                dispatcher.request_stop()
            maintenance = Maintenance(
                queue, config, parts.metrics, self._log, console=parts.console, rng=parts.rng
            )
            notifier = self._notifier = Notifier(
                config, queue, self._log, on_work=dispatcher.notify,
                on_breaker_trip=self._breaker_tripped_elsewhere, on_cancel=dispatcher.cancel,
                on_pause=dispatcher.set_paused, on_connect=maintenance.listen_connected,
                rng=parts.rng, enabled=listening,
                first_connection=handed.pop() if handed else None,
            )  # fmt: skip

            def leases() -> list[tuple[int, str]]:
                return list(dict.fromkeys([*dispatcher.leases(), *completer.pending_leases()]))

            background = [
                asyncio.create_task(completer.run(), name="worker_core.completer"),
                asyncio.create_task(
                    maintenance.heartbeat_loop(
                        leases, dispatcher.lost, dispatcher.notify, dispatcher.cancel_tokens
                    ),
                    name="worker_core.heartbeat",
                ),
                asyncio.create_task(notifier.run(), name="worker_core.listener"),
            ]
            if config.queue.stall_warning_seconds is not None:
                watchdog = StallWatchdog(
                    asyncio.get_running_loop(), config.queue.stall_warning_seconds,
                    describe=self._describe, metrics=parts.metrics, logger=self._log,
                )  # fmt: skip
                watchdog.start()
            if config.health.http_port is not None:
                from .health import HealthServer  # aiohttp loads only here

                server = HealthServer(
                    parts.view, host=config.health.http_host, port=config.health.http_port
                )
                await server.start()
            # The start-up reads one after the other on one connection, before the
            # loops that repeat them start: at the same moment, each would open a
            # connection of its own (a backend start and an authentication each).
            if await maintenance.rescue():
                dispatcher.notify()
            await parts.console.start(queue)  # in the workers registry from now on
            if listening:
                # LISTEN coming up asks for the paused queues again (what was said
                # before it was may be lost): read them once after it, not twice.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LISTEN_START_WAIT):
                        await notifier.first_attempt.wait()
            paused_read = await maintenance.read_paused(dispatcher.set_paused)
            try:
                bloated = bool(await maintenance.claim_indexes_bloated())
            except Exception:
                bloated = True  # the loop looks again at once, and logs what fails
            background += [
                asyncio.create_task(
                    maintenance.paused_loop(
                        lambda: notifier.connected,
                        dispatcher.set_paused,
                        read_first=not paused_read,
                    ),
                    name="worker_core.paused",
                ),
                asyncio.create_task(maintenance.prune_loop(), name="worker_core.prune"),
                asyncio.create_task(maintenance.vacuum_loop(), name="worker_core.vacuum"),
                asyncio.create_task(
                    maintenance.reindex_loop(look_now=bloated), name="worker_core.reindex"
                ),
                asyncio.create_task(maintenance.history_loop(), name="worker_core.history"),
                asyncio.create_task(maintenance.registry_loop(), name="worker_core.registry"),
                asyncio.create_task(maintenance.alerts_loop(), name="worker_core.alerts"),
                *start_schedules(schedules, queue, self._log),
            ]
            self._log.info(
                "worker started",
                concurrency=config.queue.concurrency,
                queues=list(config.queue.names),
                **(
                    {"stages": [s.name for s in stages]}
                    if stages is not None
                    else {"kinds": {k: [s.name for s in p] for k, p in (by_kind or {}).items()}}
                ),
            )
            await dispatcher.run(until_empty)
        finally:
            try:
                if self._dispatcher is not None:
                    await self._dispatcher.drain()
            finally:
                try:
                    # A second cancellation of the run (its caller's timeout while it
                    # stops) may cut this wait short, never what follows.
                    await self._cancel_all(background)
                finally:
                    if watchdog is not None:
                        watchdog.stop()
                    if server is not None:
                        with contextlib.suppress(Exception):
                            await server.stop()
                    for conn in handed:  # the start failed before LISTEN took it
                        with contextlib.suppress(Exception):
                            await conn.close()
                    if notifier is not None:
                        await notifier.close_unused()
                    await self._finish(started, restore_signals)

    async def _cancel_all(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel the run's own tasks and wait for them, within a bound: a task that
        does not end (it swallowed its cancellation) is logged with where it is, and
        the worker stops anyway instead of hanging in its shutdown."""
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=CANCEL_WAIT)
        for task in pending:
            frames = task.get_stack(limit=3)
            self._log.error(
                "a worker task did not end when cancelled; stopping without it",
                task=task.get_name(),
                at=[f"{f.f_code.co_name}:{f.f_lineno}" for f in frames],
            )
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failure was logged where it happened

    async def _finish(self, started: bool, restore_signals: Callable[[], None]) -> None:
        parts = self._parts
        try:
            if started:
                try:
                    await parts.on_shutdown()
                except Exception:
                    self._log.exception("on_shutdown hook failed")
            await parts.console.stop()  # last history rollups; leaves the registry
            with contextlib.suppress(Exception):
                await parts.breakers.detach()
            with contextlib.suppress(Exception):
                await parts.limiters.detach()
        finally:
            restore_signals()
            if self._completer is not None:
                self._completer.fail_waiters()
            for pool in (self._threads, self._processes):
                if pool is not None:
                    _shutdown(pool)
            self._threads = self._processes = None
            if self._pool is not None and parts.pool is None:
                await self._pool.close()
            self._pool = None
            self.running = False
            self._stopped.set()
            summary = parts.metrics.summary()
            keys = ("processed", "failed", "retried", "deferred", "dead_lettered", "released")
            self._log.info("worker stopped", **{k: summary[k] for k in keys})

    async def _check_schema(self, queue: Queue) -> None:
        applied = await queue.applied_versions()
        if not applied:
            raise RuntimeError(
                f"schema {queue.schema!r} is not installed: run `worker-core migrate` "
                "or `await Queue(config).migrate()` first"
            )
        missing = sorted({m.version for m in migrations()} - applied)
        if missing:
            raise RuntimeError(
                f"schema {queue.schema!r} lacks migrations {missing} that this worker_core "
                "needs: run `worker-core migrate`"
            )

    def _paused_for(self) -> float | None:
        """Seconds until a required breaker may half-open, while one is open."""
        from .breaker import CircuitState

        waits = []
        for name in self._parts.required_breakers:
            breaker = self._parts.breakers.get(name)
            if breaker.state is CircuitState.OPEN:
                waits.append(max(breaker.retry_after, 0.01))
        if not waits:
            return None
        self._log.debug("claiming paused: required breaker open", wait=min(waits))
        return min(waits)

    def _breaker_tripped_elsewhere(self) -> None:
        """Another worker opened a fleet breaker: read the fleet state now, not on the
        next call, so this worker stops calling the dead service at once."""
        store = self._parts.breakers.store
        if store.active:
            store.spawn(store.refresh(max_age=0.0))

    def _describe(self, task: asyncio.Task[Any] | None) -> dict[str, Any]:
        """Job, stage and task of a task that blocks the loop (for the watchdog)."""
        about: dict[str, Any] = {"task": task.get_name() if task is not None else None}
        run = self._dispatcher.run_of(task) if self._dispatcher is not None else None
        if run is not None:
            about.update(
                job_id=run.job.id,
                stage=run.current_stage,
                attempt=run.job.attempt,
                correlation_id=run.job.correlation_id,
            )
        return about

    def _install_signal_handlers(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        installed: list[tuple[int, Any]] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signal support on this platform
            installed.append((sig, previous))

        def restore() -> None:
            for sig, previous in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
                    if previous is not None and previous is not signal.SIG_DFL:
                        signal.signal(sig, previous)

        return restore

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stop_requested:
            self._log.warning("second signal: releasing in-flight jobs now", signal=name)
            if self._dispatcher is not None:
                self._dispatcher.force_stop()
            return
        self._log.info("signal received: shutting down gracefully", signal=name)
        self.request_stop()


def _nothing() -> None:
    return None


def _shutdown(pool: PoolExecutor) -> None:
    # Cancelled runs stop waiting at once; a call already running in a thread or a
    # child process finishes on its own (neither can be interrupted safely).
    pool.shutdown(wait=False, cancel_futures=True)

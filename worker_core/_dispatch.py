"""The dispatcher: the claim loop, the prefetch buffer, the runs in flight and the drain.

It claims up to its free slots (plus ``queue.prefetch``) in one statement, from
every queue of ``queue.name`` within each one's ``queue.queue_concurrency`` and
only the kinds the worker knows, starts one task per claim, and keeps the runs
by lease token. It stops runs an operator cancels (``cancel``) and holds back
buffered jobs of queues an operator pauses (``set_paused``). A claim that returns a job
this worker still runs under an older token (its lease was lost while the event
loop was blocked, and the job was rescued and claimed again) cancels the stale
run first; the new run waits for it to end before its stages start.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from ._completer import Completer
from ._executor import CANCEL, LEASE_LOST, RELEASE, Executor, Run
from .config import WorkerConfig
from .jobs import Job
from .logs import StructuredLogger
from .metrics import ProcessingMetrics
from .outcomes import release
from .queue import Queue
from .redact import redact_text

__all__ = ["Dispatcher"]


class Dispatcher:
    """Claims and starts jobs for one ``run()`` of a worker."""

    def __init__(
        self,
        *,
        queue: Queue,
        completer: Completer,
        executor: Executor,
        config: WorkerConfig,
        metrics: ProcessingMetrics,
        logger: StructuredLogger,
        worker_id: str,
        paused_for: Callable[[], float | None],
        kinds: list[str] | None = None,
    ) -> None:
        self._queue = queue
        self._completer = completer
        self._executor = executor
        self._config = config
        self._metrics = metrics
        self._logger = logger
        self._worker_id = worker_id
        self._paused_for = paused_for
        #: The kinds this worker claims (None: any kind).
        self._kinds = kinds
        self._names = config.queue.names
        #: Queues with a fleet-wide max_running (a finished run of one may free a slot).
        self._capped = frozenset(n for n in self._names if config.queue.cap(n) is not None)
        #: Queues an operator paused, as last heard (NOTIFY or poll), and when this
        #: worker heard it; the claim itself skips paused queues, this holds back
        #: what is already buffered or was claimed just before the pause.
        self.paused: dict[str, float] = {}
        #: Runs whose task has not ended, by lease token.
        self._runs: dict[str, Run] = {}
        #: The newest run of each job id (a stale one may still be in ``_runs``).
        self._latest: dict[int, Run] = {}
        self._by_task: dict[asyncio.Task[None], Run] = {}
        #: Claimed (under lease) but not started: the prefetch buffer.
        self._buffer: collections.deque[Job] = collections.deque()
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.force = False
        self.draining = False
        self.maybe_work = True
        #: Counts the signs of work (NOTIFY, a freed max_running slot): one that
        #: arrives while a claim is in flight outlives that claim's empty answer,
        #: whose snapshot may predate the job it announces.
        self._signs = 0
        self.last_loop_at: float | None = None
        self.last_claim_at: float | None = None

    # -- what others read ----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._runs)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def owns(self, task: asyncio.Task[object] | None) -> bool:
        return task in self._by_task

    def run_of(self, task: asyncio.Task[object] | None) -> Run | None:
        """The run a task executes (None for any other task)."""
        return self._by_task.get(task) if task is not None else None  # type: ignore[arg-type]

    def leases(self) -> list[tuple[int, str]]:
        """``(job id, token)`` of every lease this worker holds: runs and the buffer."""
        held = [(run.job.id, token) for token, run in self._runs.items() if not run.finished]
        held += [(job.id, job.lease_token or "") for job in self._buffer]
        return held

    def lost(self, tokens: Iterable[str]) -> None:
        """Leases the heartbeat found gone: stop their runs, forget their buffered jobs."""
        gone = set(tokens)
        for token in gone:
            run = self._runs.get(token)
            if run is not None:
                run.cancel(LEASE_LOST)
        if self._buffer and gone:
            kept = [job for job in self._buffer if job.lease_token not in gone]
            if len(kept) < len(self._buffer):
                self._metrics.lease_lost(len(self._buffer) - len(kept))
                self._buffer = collections.deque(kept)

    def cancel(self, job_id: int) -> bool:
        """An operator cancelled job ``job_id``: stop its run here at its next await, or
        cancel it unstarted if it waits in the buffer. False: not this worker's."""
        run = self._latest.get(job_id)
        if run is not None and not run.done:
            return run.cancel(CANCEL)
        for job in self._buffer:
            if job.id == job_id:
                self._buffer.remove(job)
                self._executor.cancel_unstarted(job)
                return True
        return False

    def cancel_tokens(self, tokens: Iterable[str]) -> None:
        """The heartbeat found cancel requests on these leases (a missed NOTIFY)."""
        for token in tokens:
            run = self._runs.get(token)
            if run is not None:
                run.cancel(CANCEL)
            else:
                for job in self._buffer:
                    if job.lease_token == token:
                        self.cancel(job.id)
                        break

    def set_paused(self, queues: Iterable[str], paused: bool = True) -> None:
        """An operator paused (or resumed) these queues: buffered jobs of a paused
        queue go back unstarted (attempt refunded); a resume looks for work."""
        names = set(queues) & set(self._names)
        if not names:
            return
        if paused:
            now = time.monotonic()
            for name in names - self.paused.keys():
                self.paused[name] = now
            held = [job for job in self._buffer if job.queue in names]
            if held:
                self._buffer = collections.deque(j for j in self._buffer if j.queue not in names)
                self._release_unstarted(held)
        elif names & self.paused.keys():
            for name in names:
                self.paused.pop(name, None)
            self.notify()

    def notify(self) -> None:
        """Something may be claimable now (NOTIFY, a rescue, LISTEN reconnected)."""
        self.maybe_work = True
        self._signs += 1
        self.wake.set()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            self._logger.info("stopping: no new claims", in_flight=len(self._runs))
        self.stopping.set()
        self.wake.set()

    def force_stop(self) -> None:
        self.force = True
        self.wake.set()

    # -- the claim loop --------------------------------------------------------------
    async def run(self, until_empty: bool) -> None:
        queue_cfg = self._config.queue
        capacity = queue_cfg.concurrency + queue_cfg.prefetch
        # With a prefetch buffer, small refills wait until a quarter of it is free,
        # so one finishing job does not cost one claim round trip.
        min_refill = max(1, queue_cfg.prefetch // 4) if queue_cfg.prefetch else 1
        error_delay = 0.05
        while not self.stopping.is_set():
            self.last_loop_at = time.monotonic()
            self._start_buffered()
            room = capacity - len(self._runs) - len(self._buffer)
            rooms = self._rooms(room)
            room = min(room, sum(rooms.values()))
            starving = not self._buffer and len(self._runs) < queue_cfg.concurrency
            wanted = room > 0 and (starving or room >= min_refill)
            if wanted and (self.maybe_work or not (self._runs or self._buffer)):
                pause = self._paused_for()
                if pause is not None:
                    await self._wait(min(pause, queue_cfg.poll_interval))
                    continue
                self.wake.clear()
                signs = self._signs
                claim_started = time.monotonic()
                try:
                    jobs = await self._queue.claim(
                        self._worker_id,
                        room,
                        lease_seconds=queue_cfg.lease_seconds,
                        kinds=self._kinds,
                        rooms=rooms,
                    )
                except Exception as exc:
                    self._logger.warning(
                        "claim failed; retrying",
                        error=redact_text(str(exc)),
                        error_type=type(exc).__name__,
                        retry_in=round(error_delay, 3),
                    )
                    await self._wait(error_delay)
                    error_delay = min(error_delay * 2, queue_cfg.poll_interval)
                    continue
                error_delay = 0.05
                self.last_claim_at = time.monotonic()
                self._metrics.claim_completed(self.last_claim_at - claim_started, len(jobs))
                drained = len(jobs) < room
                # A sign of work that came during the claim is not answered by it.
                self.maybe_work = not drained or self._signs != signs
                if jobs:
                    self._metrics.job_claimed(len(jobs))
                    if self.stopping.is_set():
                        self._release_unstarted(jobs)
                        break
                    self._accept(jobs, claim_started)
                if until_empty and drained and not self._runs and not self._buffer:
                    if self._completer.busy:
                        await self._completer.flush()  # a retry written now may be ready at once
                        self.maybe_work = True
                        continue
                    soon = await self._next_ready_in()
                    if soon is None:
                        break
                    await self._wait(soon)
                    self.maybe_work = True
                    continue
                if not drained:
                    continue  # full: wait for a slot to free
            await self._wait(queue_cfg.poll_interval)

    def _rooms(self, room: int) -> dict[str, int]:
        """How many jobs of each queue the next claim may take (``queue_concurrency``)."""
        caps = self._config.queue.queue_concurrency
        if not caps or room <= 0:
            return dict.fromkeys(self._names, max(room, 0))
        held = collections.Counter(run.job.queue for run in self._runs.values())
        held.update(job.queue for job in self._buffer)
        return {
            name: max(0, min(room, caps[name] - held[name])) if name in caps else room
            for name in self._names
        }

    def _accept(self, jobs: list[Job], claim_started: float) -> None:
        if self.paused:
            # A claim begun after a pause skips the queue: a job of it means the queue
            # was resumed unheard. One begun before may bring jobs that go back unstarted.
            paused_at = self.paused
            held = [j for j in jobs if paused_at.get(j.queue, claim_started) > claim_started]
            for queue in {j.queue for j in jobs} & paused_at.keys():
                if paused_at[queue] < claim_started:
                    del paused_at[queue]
            if held:
                self._release_unstarted(held)
                gone = {j.id for j in held}
                jobs = [j for j in jobs if j.id not in gone]
        claimed = {job.id for job in jobs}
        if self._buffer and any(job.id in claimed for job in self._buffer):
            # Claimed again while still buffered under an expired lease: the old claim is void.
            stale = [job for job in self._buffer if job.id in claimed]
            self._buffer = collections.deque(j for j in self._buffer if j.id not in claimed)
            self._metrics.lease_lost(len(stale))
        self._buffer.extend(jobs)
        self._start_buffered()

    def _start_buffered(self) -> None:
        free = self._config.queue.concurrency - len(self._runs)
        while free > 0 and self._buffer:
            self._start(self._buffer.popleft())
            free -= 1

    def _start(self, job: Job) -> None:
        previous = self._latest.get(job.id)
        if previous is not None and not previous.done:
            if previous.cancel(LEASE_LOST):
                self._logger.warning(
                    "job claimed again while a stale run of it is still here; "
                    "cancelling the stale run first",
                    job_id=job.id,
                    attempt=job.attempt,
                    stale_attempt=previous.job.attempt,
                )
        else:
            previous = None
        run = self._executor.new_run(job, previous)
        task = asyncio.create_task(self._executor.execute(run), name=f"worker_core.job.{job.id}")
        run.task = task
        self._runs[run.token] = run
        self._latest[job.id] = run
        self._by_task[task] = run
        task.add_done_callback(functools.partial(self._task_done, run))

    def _task_done(self, run: Run, task: asyncio.Task[None]) -> None:
        self._runs.pop(run.token, None)
        self._by_task.pop(task, None)
        if self._latest.get(run.job.id) is run:
            del self._latest[run.job.id]
        if self._capped and run.job.queue in self._capped:
            # A fleet-wide slot of a capped queue is free: jobs the cap held back may
            # be claimable although the last claim came back short.
            self.maybe_work = True
            self._signs += 1
        self.wake.set()

    def _release_unstarted(self, jobs: Iterable[Job]) -> None:
        n = 0
        for job in jobs:
            self._completer.submit(release(job, stage=job.stage, state=None))
            n += 1
        self._metrics.job_released(n)

    async def _next_ready_in(self) -> float | None:
        """Seconds until the next queued job is ready, if within one poll interval."""
        run_at = await self._queue.next_run_at(kinds=self._kinds)
        if run_at is None:
            return None
        wait = (run_at - datetime.now(UTC)).total_seconds()
        poll = self._config.queue.poll_interval
        if wait <= 0 and any(self._config.queue.cap(n) is not None for n in self._names):
            # Ready, yet the claim came back short: max_running holds it until another
            # worker's job of the queue ends. Look again soon, not in a busy loop.
            wait = min(poll, 0.1)
        return max(wait, 0.001) if wait <= poll else None

    async def _wait(self, timeout: float) -> None:
        """Sleep until woken (NOTIFY, a freed slot, stop) or ``timeout`` passes."""
        if self.wake.is_set():
            self.wake.clear()
            return
        try:
            async with asyncio.timeout(timeout):
                await self.wake.wait()
        except TimeoutError:
            self.maybe_work = True  # the fallback poll: also finds jobs whose run_at came
        self.wake.clear()

    # -- shutdown ------------------------------------------------------------------
    async def drain(self) -> None:
        """Release the buffer, let runs finish within ``shutdown_timeout``, release the
        rest, and write every pending outcome."""
        self.draining = True
        if self._buffer:
            self._release_unstarted(self._buffer)
            self._buffer.clear()
        timeout = self._config.queue.shutdown_timeout
        if self._runs and not self.force:
            self._logger.info("waiting for in-flight jobs", in_flight=len(self._runs),
                              timeout=timeout)  # fmt: skip
            deadline = time.monotonic() + timeout
            while self._runs and not self.force:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.wait(
                    self._tasks(), timeout=min(left, 0.5), return_when=asyncio.FIRST_COMPLETED
                )
        for run in list(self._runs.values()):
            run.cancel(RELEASE)
        if self._runs:
            await asyncio.wait(self._tasks(), timeout=5.0)
        try:
            async with asyncio.timeout(max(10.0, timeout)):
                await self._completer.flush()
        except TimeoutError:
            self._logger.error(
                "could not write every outcome before exit; "
                "their leases will expire and the jobs will be rescued",
                pending=len(self._completer),
            )

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [run.task for run in self._runs.values() if run.task is not None]

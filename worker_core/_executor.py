"""The executor: runs one claim of a job through its stages and turns the run into
exactly one outcome (``worker_core.outcomes``), handed to the completer.

A ``Run`` is one claim: the job, its lease token and what the run has stored so
far. Runs are keyed by token, never by job id: after a lost lease the same job
may be claimed again by the same worker while the stale run still unwinds; the
new run starts its stages only once the stale one has ended.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import _tracing
from ._completer import Completer
from .config import WorkerConfig
from .errors import LeaseLostError, PermanentError, TransientError
from .jobs import Job, JobStatus, Transition
from .logs import StructuredLogger, job_context
from .metrics import ProcessingMetrics
from .outcomes import (
    after_failure,
    bury,
    checkpoint,
    error_json,
    error_record,
    finite_delay,
    release,
    succeed,
)
from .outcomes import cancel as cancelled_outcome
from .retry import ErrorKind, backoff
from .stages import RunServices, Stage, StageContext, state_json

__all__ = ["Executor", "Hooks", "Run"]

#: Why a run was cancelled by the worker itself (not by a stage).
LEASE_LOST, RELEASE, CANCEL = "lease_lost", "release", "cancel"


@dataclass(frozen=True, slots=True)
class Hooks:
    """The worker's policies and hooks, as plain callables (the façade's methods).

    A hook left ``None`` is not overridden: its outcome is not waited for.
    """

    classify: Callable[[BaseException], ErrorKind]
    retry_delay: Callable[[Job, BaseException], float]
    on_job_done: Callable[[Job], Awaitable[None]] | None = None
    on_dead_letter: Callable[[Job, BaseException], Awaitable[None]] | None = None
    on_cancelled: Callable[[Job], Awaitable[None]] | None = None


class Recorder(Protocol):
    """Where attempts and stages are counted for the persisted metrics history
    (``worker_core.history.HistoryRecorder``); no I/O."""

    def job(self, queue: str, kind: str, outcome: str, seconds: float) -> None: ...

    def stage(self, queue: str, kind: str, stage: str, ok: bool, seconds: float) -> None: ...


class _NoRecorder:
    def job(self, queue: str, kind: str, outcome: str, seconds: float) -> None:
        return None

    def stage(self, queue: str, kind: str, stage: str, ok: bool, seconds: float) -> None:
        return None


class Run:
    """One claim of one job, from claim to outcome."""

    __slots__ = (
        "_completer",
        "_max_state",
        "cancel_reason",
        "current_stage",
        "finished",
        "job",
        "previous",
        "saved_state",
        "stage",
        "started",
        "task",
        "token",
    )

    def __init__(
        self, job: Job, completer: Completer, *, max_state_bytes: int, previous: Run | None
    ) -> None:
        if not job.lease_token:
            raise ValueError(f"job {job.id} was not claimed: it has no lease token")
        self.job = job
        #: The claim's lease token: this run's key, and the fence of its writes.
        self.token: str = job.lease_token
        self._completer = completer
        self._max_state = max_state_bytes
        #: A stale run of the same job that must end before this one starts its stages.
        self.previous = previous
        #: Last completed stage (the job's checkpoint).
        self.stage = job.stage
        #: JSON of the last state stored by this run (None: unchanged in the database).
        self.saved_state: str | None = None
        #: The stage running now (for the stall watchdog's warning).
        self.current_stage: str | None = None
        self.started = time.monotonic()
        #: A terminal outcome was submitted: the run no longer holds anything to cancel.
        self.finished = False
        #: Set by the worker before it cancels the task: LEASE_LOST, RELEASE or CANCEL.
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    def cancel(self, reason: str) -> bool:
        """Stop the run at its next await (False when there is nothing to stop)."""
        if self.finished or self.task is None or self.task.done():
            return False
        self.cancel_reason = self.cancel_reason or reason
        self.task.cancel()
        return True

    async def checkpoint(self, state: dict[str, Any], stage: str | None) -> None:
        text = state_json(state, stage, max_bytes=self._max_state)
        future = self._completer.submit(
            checkpoint(self.job, stage=self.stage, state=text), wait=True
        )
        assert future is not None
        if not await future:
            raise LeaseLostError(f"job {self.job.id}: lease lost during stage {stage!r}")
        self.saved_state = text


class Executor:
    """Runs claims of jobs for one ``run()`` of a worker."""

    def __init__(
        self,
        *,
        stages: Sequence[Stage] | None = None,
        pipelines: Mapping[str, Sequence[Stage]] | None = None,
        hooks: Hooks,
        config: WorkerConfig,
        metrics: ProcessingMetrics,
        logger: StructuredLogger,
        completer: Completer,
        services: RunServices,
        worker: Any,
        worker_id: str,
        rng: random.Random,
        recorder: Recorder | None = None,
    ) -> None:
        if (stages is None) == (pipelines is None):
            raise ValueError("give stages (every kind) or pipelines (per kind), not both")
        #: One stage list for every kind (None: only the kinds of ``_pipelines``).
        self._stages = None if stages is None else list(stages)
        self._pipelines = {kind: list(p) for kind, p in (pipelines or {}).items()}
        # Not `recorder or ...`: an empty HistoryRecorder is falsy (it has a length).
        self._recorder: Recorder = _NoRecorder() if recorder is None else recorder
        self._hooks = hooks
        self._config = config
        self._metrics = metrics
        self._logger = logger
        self._completer = completer
        self._services = services
        self._worker = worker
        self._worker_id = worker_id
        self._rng = rng
        self._secrets = tuple(config.secrets())
        self._background: set[asyncio.Task[None]] = set()
        self._max_state = config.queue.max_state_bytes
        # Per-job lines are skipped before any formatting work when their level is off.
        self._enabled = logging.getLogger(logger.name).isEnabledFor

    def new_run(self, job: Job, previous: Run | None) -> Run:
        return Run(job, self._completer, max_state_bytes=self._max_state, previous=previous)

    async def execute(self, run: Run) -> None:
        """Run ``run`` to its outcome; never raises (but for cancellation from outside)."""
        job = run.job
        self._metrics.job_started()
        try:
            with job_context(
                correlation_id=job.correlation_id,
                job_id=job.id,
                queue=job.queue,
                attempt=job.attempt,
                worker_id=self._worker_id,
            ):
                if _tracing.enabled():  # the one check tracing costs a job when off
                    with _tracing.consumer(
                        job, worker_id=self._worker_id, secrets=self._secrets
                    ) as trace:
                        await self._execute(run, trace)
                else:
                    await self._execute(run, None)
        finally:
            self._metrics.job_ended()

    async def _execute(self, run: Run, trace: _tracing.Consumer | None) -> None:
        job = run.job
        state = dict(job.state)
        ctx = StageContext(
            job, state, worker=self._worker, services=self._services, run=run,
            metrics=self._metrics,
        )  # fmt: skip
        stages = self._stages if self._stages is not None else self._pipelines.get(job.kind)
        if not stages:
            # Never claimed (the claim asks for known kinds only), unless called directly.
            exc = PermanentError(f"this worker has no pipeline for kind {job.kind!r}")
            await self._fail(run, exc, None)
            return
        last = stages[-1]
        try:
            previous = run.previous
            if previous is not None and previous.task is not None and not previous.done:
                # The same job, claimed again while a stale run of it unwinds here:
                # never two runs of one job at once in one process.
                await asyncio.wait([previous.task])
            run.previous = None
            if self._enabled(logging.DEBUG):
                self._logger.debug(
                    "job claimed", job_id=job.id, attempt=job.attempt, stage=job.stage
                )
            for stage in self._remaining(job, stages):
                run.current_stage = ctx.stage = stage.name
                with job_context(stage=stage.name):
                    if trace is None:
                        await self._run_stage(stage, ctx)
                    else:
                        with trace.stage(stage.name):
                            await self._run_stage(stage, ctx)
                if run.cancel_reason is not None:
                    # The stage swallowed our CancelledError: the run still ends here.
                    raise asyncio.CancelledError
                text = state_json(state, stage.name, max_bytes=self._max_state)
                run.stage = stage.name
                if stage is not last:
                    # Fire-and-forget: a crash before the flush re-runs one idempotent
                    # stage; the final outcome supersedes it anyway.
                    self._completer.submit(checkpoint(job, stage=run.stage, state=text))
                run.saved_state = text
            run.current_stage = None
            done = self._succeed(run)
            if done is not None:  # on_job_done is overridden: it hears of the write
                await self._job_done(run, state, done)
        except asyncio.CancelledError:
            if run.cancel_reason is None:  # raised inside a stage, not a cancellation of ours
                await self._fail(run, TransientError("stage was cancelled"), run.current_stage)
            else:
                await self._cancelled(run)
        except Exception as exc:
            if trace is not None:
                trace.failed(exc)
            await self._fail(run, exc, run.current_stage)

    def _remaining(self, job: Job, stages: list[Stage]) -> list[Stage]:
        if job.stage is None:
            return stages
        names = [s.name for s in stages]
        if job.stage in names:
            return stages[names.index(job.stage) + 1 :]
        self._logger.warning(
            "checkpointed stage is not one of this worker's stages; starting over",
            job_id=job.id,
            checkpoint=job.stage,
            kind=job.kind,
        )
        return stages

    async def _run_stage(self, stage: Stage, ctx: StageContext) -> None:
        started = time.monotonic()
        timeout = getattr(stage, "timeout", None)
        try:
            if timeout:
                try:
                    async with asyncio.timeout(timeout):
                        await stage.run(ctx)
                except TimeoutError as exc:
                    raise TimeoutError(
                        f"stage {stage.name!r} exceeded its timeout of {timeout}s"
                    ) from exc
            else:
                await stage.run(ctx)
        except BaseException:
            elapsed = time.monotonic() - started
            self._metrics.stage_failed(stage.name, elapsed)
            self._recorder.stage(ctx.job.queue, ctx.job.kind, stage.name, False, elapsed)
            raise
        elapsed = time.monotonic() - started
        self._metrics.stage_completed(stage.name, elapsed)
        self._recorder.stage(ctx.job.queue, ctx.job.kind, stage.name, True, elapsed)
        if self._enabled(logging.DEBUG):
            self._logger.debug("stage done", seconds=round(elapsed, 6))

    def _succeed(self, run: Run) -> asyncio.Future[bool] | None:
        """Submit the success; a future of its write when ``on_job_done`` waits for it.
        Not a coroutine: the common success awaits nothing."""
        job = run.job
        run.finished = True
        future = self._completer.submit(
            succeed(job, stage=run.stage, state=run.saved_state),
            wait=self._hooks.on_job_done is not None,
        )
        elapsed = time.monotonic() - run.started
        self._metrics.job_succeeded(elapsed)
        self._recorder.job(job.queue, job.kind, "succeeded", elapsed)
        if self._enabled(logging.INFO):
            self._logger.info("job succeeded", seconds=round(elapsed, 6))
        return future

    async def _job_done(
        self, run: Run, state: dict[str, Any], written: asyncio.Future[bool]
    ) -> None:
        hook = self._hooks.on_job_done
        if hook is not None and await written:
            done = replace(
                run.job, status=JobStatus.SUCCEEDED, stage=run.stage, state=state,
                lease_token=None,
            )  # fmt: skip
            await self._call_hook("on_job_done", hook(done))

    async def _cancelled(self, run: Run) -> None:
        job, reason = run.job, run.cancel_reason
        if run.finished:
            return
        if reason == LEASE_LOST:
            self._metrics.lease_lost()
            self._logger.warning("lease lost: run abandoned (the job was rescued or claimed again)")
            return
        run.finished = True
        if reason == CANCEL:
            hook = self._hooks.on_cancelled
            future = self._completer.submit(
                cancelled_outcome(job, stage=run.stage, state=run.saved_state),
                wait=hook is not None,
            )
            self._logger.info("job cancelled", stage=run.current_stage)
            if hook is not None and future is not None and await future:
                gone = replace(job, status=JobStatus.CANCELLED, stage=run.stage, lease_token=None)
                await self._call_hook("on_cancelled", hook(gone))
            return
        self._completer.submit(release(job, stage=run.stage, state=run.saved_state))
        self._metrics.job_released()
        self._logger.info("job released at shutdown; attempt refunded", stage=run.stage)

    def cancel_unstarted(self, job: Job) -> None:
        """Cancel a claimed job that never started (it waited in the prefetch buffer)."""
        run = self.new_run(job, None)
        run.cancel_reason = CANCEL
        task = asyncio.create_task(self._cancelled(run), name=f"worker_core.cancel.{job.id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail(self, run: Run, exc: Exception, stage: str | None) -> None:
        if isinstance(exc, LeaseLostError):
            self._metrics.lease_lost()
            self._logger.warning("lease lost: run abandoned", error=str(exc))
            return
        try:
            await self._fail_with_outcome(run, exc, stage)
        except Exception as bug:
            # Whatever went wrong while recording the failure, the job must not be left
            # running for its lease to expire attempt after attempt: bury it with both.
            self._logger.exception("recording a failure failed; dead-lettering the job")
            if not run.finished:
                run.finished = True
                record = error_record(
                    bug,
                    kind=ErrorKind.PERMANENT,
                    stage=stage,
                    attempt=run.job.attempt,
                    worker_id=self._worker_id,
                    note=f"while recording {type(exc).__name__}",
                    secrets=self._secrets,
                )
                self._completer.submit(
                    bury(run.job, stage=run.stage, state=run.saved_state, error=error_json(record))
                )
                self._metrics.attempt_failed(type(exc).__name__, 0.0, "dead")
                self._recorder.job(run.job.queue, run.job.kind, "dead", 0.0)

    async def _fail_with_outcome(self, run: Run, exc: Exception, stage: str | None) -> None:
        job = run.job
        elapsed = time.monotonic() - run.started
        try:
            kind = ErrorKind(self._hooks.classify(exc))
        except Exception:
            self._logger.exception("classify() failed; treating the error as transient")
            kind = ErrorKind.TRANSIENT
        retry = self._config.retry
        delay = self._delay(job, exc)
        record = error_record(
            exc, kind=kind, stage=stage, attempt=job.attempt, worker_id=self._worker_id,
            secrets=self._secrets,
        )  # fmt: skip
        outcome, plan = after_failure(
            job,
            kind,
            max_deferrals=retry.max_deferrals,
            stage=run.stage,
            state=run.saved_state,
            delay=delay,
            record=record,
        )
        error_type = record["type"]
        run.finished = True
        if outcome.event in (Transition.DEFER, Transition.RETRY):
            deferred = outcome.event is Transition.DEFER
            self._completer.submit(outcome)
            self._metrics.attempt_failed(error_type, elapsed, "deferred" if deferred else "retried")
            self._recorder.job(job.queue, job.kind, "deferred" if deferred else "retried", elapsed)
            if deferred:
                log, event = self._logger.info, "job deferred"
                count = {"deferrals": job.deferrals + 1}
            else:
                log, event = self._logger.warning, "job failed; will retry"
                count = {"attempts_left": job.max_attempts - job.attempt}
            log(event, stage=stage, retry_in=round(delay, 3), error_type=error_type,
                error=record["message"], **count)  # fmt: skip
            return
        hook = self._hooks.on_dead_letter
        future = self._completer.submit(outcome, wait=hook is not None)
        self._metrics.attempt_failed(error_type, elapsed, "dead")
        self._recorder.job(job.queue, job.kind, "dead", elapsed)
        self._logger.error(
            "job dead-lettered",
            stage=stage,
            reason=plan.note or "permanent error",
            error_type=error_type,
            error=record["message"],
        )
        if hook is not None and future is not None and await future:
            stored = {**record, "kind": plan.kind.value}
            if plan.note:
                stored["note"] = plan.note
            dead = replace(
                job,
                status=JobStatus.DEAD,
                stage=run.stage,
                last_error=stored,
                errors=[*job.errors, stored],
                lease_token=None,
            )
            await self._call_hook("on_dead_letter", hook(dead, exc))

    def _delay(self, job: Job, exc: BaseException) -> float:
        """``retry_delay()``, if it is a finite number of seconds; else backoff."""
        try:
            value: object = self._hooks.retry_delay(job, exc)
        except Exception:
            self._logger.exception("retry_delay() failed; using backoff")
            value = None
        delay = finite_delay(value)
        if delay is None:
            if value is not None:
                self._logger.warning(
                    "retry_delay() did not return a finite number of seconds; using backoff",
                    value=repr(value)[:100],
                )
            retry = self._config.retry
            delay = backoff(
                max(job.attempt, 1),
                base_delay=retry.base_delay,
                max_delay=retry.max_delay,
                rng=self._rng,
            )
        return delay

    async def _call_hook(self, name: str, call: Awaitable[None]) -> None:
        try:
            await call
        except Exception:
            self._logger.exception(f"{name} hook failed")

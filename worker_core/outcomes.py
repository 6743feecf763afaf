"""Outcomes: how a run of a job ends, built in one place and bounded before they are stored.

An ``Outcome`` is one fenced write of the ``finish`` statement: the job, the lease
token of the run, the *event* (a ``Transition``; the SQL looks the new status up
in ``jobs.TRANSITIONS``), the last completed stage, the state and error as JSON
text, and a delay for the next run. Only the named constructors below build one::

    checkpoint   running -> running    stage and state recorded mid-run
    succeed      running -> succeeded
    retry        running -> queued     transient error, attempts left
    defer        running -> queued     retryable error: attempt refunded, deferrals + 1
    bury         running -> dead       permanent error, attempts exhausted, unstorable result
    release      running -> queued     the worker stops before the job ends: attempt refunded
    cancel       running -> cancelled

Everything that enters a job row from a run is sanitised and bounded here: NUL
characters and lone surrogates in messages, tracebacks and details are replaced,
delays must be finite, each error record is capped (message, traceback, detail)
and says what was cut, and the stored history keeps the first and the latest
``MAX_ERROR_RECORDS`` records (``append_error`` in migration 0005).
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import RetryableError, WorkerCoreError
from .jobs import Job, Transition, clean_text
from .redact import redact_text, redact_value
from .retry import ErrorKind, FailurePlan, plan_failure

__all__ = [
    "MAX_DELAY_SECONDS",
    "MAX_DETAIL_BYTES",
    "MAX_ERROR_RECORDS",
    "MAX_MESSAGE_CHARS",
    "MAX_TRACEBACK_CHARS",
    "Outcome",
    "after_failure",
    "bury",
    "bury_unstorable",
    "cancel",
    "checkpoint",
    "defer",
    "error_json",
    "error_record",
    "finite_delay",
    "release",
    "retry",
    "succeed",
]

#: Characters of an error message kept in its record.
MAX_MESSAGE_CHARS = 2000
#: Characters of a traceback kept (its end: where the error was raised).
MAX_TRACEBACK_CHARS = 4000
#: Bytes of an error's ``detail`` (as JSON) kept in its record.
MAX_DETAIL_BYTES = 4096
#: Error records a job keeps: the first one and the latest ones (>= 3).
MAX_ERROR_RECORDS = 16
#: The longest wait before a retried or deferred job runs again (one year).
MAX_DELAY_SECONDS = 365 * 24 * 3600.0

_MAX_NAME = 200
# The detail walk stops here; nothing deeper or longer could fit in MAX_DETAIL_BYTES.
_DETAIL_DEPTH = 8
_DETAIL_ITEMS = 100
# Text is cut generously before redaction and to its limit after, so a secret that
# straddles the first cut is gone by the second.
_PRE_CUT = 4


@dataclass(frozen=True, slots=True)
class Outcome:
    """One fenced write: ``event`` moves job ``job_id`` if run ``token`` still holds it.

    ``state`` and ``error`` are JSON text (``state=None`` keeps the stored state);
    ``delay`` sets ``run_at = now() + delay`` on the database clock.
    """

    job_id: int
    token: str
    #: The attempt of the run (for logs and records; the token is the fence).
    attempt: int
    event: Transition
    stage: str | None
    state: str | None = None
    delay: float | None = None
    error: str | None = None

    @property
    def terminal(self) -> bool:
        """The run ends with this write (anything but a checkpoint)."""
        return self.event is not Transition.CHECKPOINT


def _make(
    job: Job,
    event: Transition,
    stage: str | None,
    state: str | None,
    delay: float | None = None,
    error: str | None = None,
) -> Outcome:
    if not job.lease_token:
        raise ValueError(f"job {job.id} has no lease token: only a claimed job has an outcome")
    return Outcome(job.id, job.lease_token, job.attempt, event, stage, state, delay, error)


def checkpoint(job: Job, *, stage: str | None, state: str) -> Outcome:
    """Record the last completed ``stage`` and ``state`` of a running job."""
    return _make(job, Transition.CHECKPOINT, stage, state)


def succeed(job: Job, *, stage: str | None, state: str | None) -> Outcome:
    """Every stage completed."""
    return _make(job, Transition.SUCCEED, stage, state)


def retry(job: Job, *, stage: str | None, state: str | None, delay: float, error: str) -> Outcome:
    """A transient failure with attempts left: queued again after ``delay`` seconds."""
    return _make(job, Transition.RETRY, stage, state, _delay(delay), error)


def defer(job: Job, *, stage: str | None, state: str | None, delay: float, error: str) -> Outcome:
    """A retryable failure (rate limit, open circuit): queued again, attempt refunded."""
    return _make(job, Transition.DEFER, stage, state, _delay(delay), error)


def bury(job: Job, *, stage: str | None, state: str | None, error: str) -> Outcome:
    """To the dead-letter queue."""
    return _make(job, Transition.BURY, stage, state, None, error)


def release(job: Job, *, stage: str | None, state: str | None) -> Outcome:
    """Back to queued now, attempt refunded (the worker stops before the job ended)."""
    return _make(job, Transition.RELEASE, stage, state, 0.0)


def cancel(job: Job, *, stage: str | None, state: str | None) -> Outcome:
    """Cancelled while running."""
    return _make(job, Transition.CANCEL, stage, state)


def bury_unstorable(
    outcome: Outcome, failure: BaseException, *, worker_id: str, secrets: Iterable[str] = ()
) -> Outcome:
    """``outcome`` could not be written (``failure``): the job goes to the dead-letter
    queue instead, keeping its stored state, with an error that says why."""
    record = error_record(
        failure,
        kind=ErrorKind.PERMANENT,
        stage=outcome.stage,
        attempt=outcome.attempt,
        worker_id=worker_id,
        note=f"the {outcome.event.value} outcome of this attempt could not be stored",
        secrets=secrets,
    )
    record["type"] = "UnstorableOutcome"
    record["message"] = (
        f"the result of attempt {outcome.attempt} could not be stored "
        f"({_name(type(failure).__name__)}: {record['message']})"
    )[:MAX_MESSAGE_CHARS]
    record.pop("traceback", None)  # the completer's, not the job's
    stage = None if outcome.stage is None else _name(outcome.stage)
    return Outcome(
        outcome.job_id, outcome.token, outcome.attempt, Transition.BURY, stage, None, None,
        error_json(record),
    )  # fmt: skip


def after_failure(
    job: Job,
    kind: ErrorKind,
    *,
    max_deferrals: int,
    stage: str | None,
    state: str | None,
    delay: float,
    record: Mapping[str, Any],
) -> tuple[Outcome, FailurePlan]:
    """The outcome of a failed attempt and the plan (``retry.plan_failure``) behind it.

    ``record`` comes from ``error_record``; the stored copy carries the kind after
    limits (a deferral past ``max_deferrals`` is transient) and the plan's note.
    """
    plan = plan_failure(
        kind,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        deferrals=job.deferrals,
        max_deferrals=max_deferrals,
    )
    stored = {**record, "kind": plan.kind.value}
    if plan.note:
        stored["note"] = plan.note
    error = error_json(stored)
    if plan.transition is Transition.DEFER:
        return defer(job, stage=stage, state=state, delay=delay, error=error), plan
    if plan.transition is Transition.RETRY:
        return retry(job, stage=stage, state=state, delay=delay, error=error), plan
    return bury(job, stage=stage, state=state, error=error), plan


def _delay(value: float) -> float:
    delay = finite_delay(value)
    if delay is None:
        raise ValueError(f"an outcome delay must be a finite number of seconds, not {value!r}")
    return delay


def finite_delay(value: object) -> float | None:
    """``value`` as seconds in ``[0, MAX_DELAY_SECONDS]``, or None when it is not a finite
    number (NaN, inf, not a number at all)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except (OverflowError, ValueError):
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_DELAY_SECONDS)


# -- error records ---------------------------------------------------------------------
def error_record(
    exc: BaseException,
    *,
    kind: ErrorKind,
    stage: str | None,
    attempt: int,
    worker_id: str,
    note: str | None = None,
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    """The record stored for a failed attempt: redacted, storable and bounded.

    ``type``, ``message``, ``stage``, ``attempt``, ``kind``, ``at``, ``worker``,
    and when present ``note``, ``detail``, ``retry_after`` and ``traceback``.
    ``truncated`` maps each field that was cut to its size before the cut
    (characters for ``message`` and ``traceback``; for ``detail`` the bytes of its
    JSON, with text cut before encoding counted in characters); a cut ``detail``
    is the start of that JSON, as a string. Never raises for any exception object.
    """
    known = tuple(secrets)
    truncated: dict[str, int] = {}
    record: dict[str, Any] = {
        "type": _name(type(exc).__name__),
        "message": _text(_message(exc), MAX_MESSAGE_CHARS, known, "message", truncated),
        "stage": None if stage is None else _name(stage),
        "attempt": int(attempt),
        "kind": ErrorKind(kind).value,
        "at": datetime.now(UTC).isoformat(),
        "worker": _name(worker_id),
    }
    if note:
        record["note"] = _name(note)
    if isinstance(exc, WorkerCoreError) and exc.detail:
        record["detail"] = _detail(exc.detail, known, truncated)
    if isinstance(exc, RetryableError):
        retry_after = finite_delay(exc.retry_after)
        if retry_after is not None:
            record["retry_after"] = retry_after
    tb = _traceback(exc)
    if tb:
        record["traceback"] = _text(
            tb, MAX_TRACEBACK_CHARS, known, "traceback", truncated, keep_end=True
        )
    if truncated:
        record["truncated"] = truncated
    return record


def error_json(record: Mapping[str, Any]) -> str:
    """A record from ``error_record`` as JSON text (always storable)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _name(text: str) -> str:
    return clean_text(str(text))[:_MAX_NAME]


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a user exception whose __str__ fails must not lose the failure
        return f"<{type(exc).__name__}: str() failed>"
    return text or type(exc).__name__


def _traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc, limit=-8))
    except Exception:
        return ""


def _text(
    text: str,
    limit: int,
    secrets: tuple[str, ...],
    field: str,
    truncated: dict[str, int],
    *,
    keep_end: bool = False,
) -> str:
    size = len(text)
    cut = limit * _PRE_CUT
    if size > cut:
        text = text[-cut:] if keep_end else text[:cut]
    text = redact_text(clean_text(text), secrets)
    if len(text) > limit:
        text = text[-limit:] if keep_end else text[:limit]
    if size > limit:
        truncated[field] = size
    return text


def _detail(detail: Mapping[str, Any], secrets: tuple[str, ...], truncated: dict[str, int]) -> Any:
    walk = _Walk()
    try:
        bounded = walk.storable(detail, 0)
        redacted = redact_value(bounded, secrets=secrets)
        text = json.dumps(redacted, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except Exception as exc:  # a detail we cannot even walk still leaves its record
        return f"<detail could not be stored: {type(exc).__name__}>"
    size = len(text.encode())
    if size <= MAX_DETAIL_BYTES and not walk.cut:
        return redacted
    truncated["detail"] = size + walk.cut
    return text.encode()[:MAX_DETAIL_BYTES].decode("utf-8", "ignore")


class _Walk:
    """Makes a JSON-native copy of a detail: strings cleaned and cut, containers cut,
    floats finite, anything else by its (cut) repr, no deeper than ``_DETAIL_DEPTH``;
    counts what it cut (``cut``, in characters), so the record can say so."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut = 0

    def text(self, text: str) -> str:
        limit = MAX_DETAIL_BYTES * _PRE_CUT
        if len(text) > limit:
            self.cut += len(text) - limit
            text = text[:limit]
        return clean_text(text)

    def storable(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):  # str() of a huge int raises; jsonb would store it whole
            return value if abs(value) < 2**63 else f"<int of {value.bit_length()} bits>"
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, str):
            return self.text(value)
        if depth >= _DETAIL_DEPTH:
            return "…"
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for i, (key, sub) in enumerate(value.items()):
                if i >= _DETAIL_ITEMS:
                    out["…"] = f"{len(value) - i} more"
                    break
                out[clean_text(str(key)[:_MAX_NAME])] = self.storable(sub, depth + 1)
            return out
        if isinstance(value, list | tuple):
            items = [self.storable(sub, depth + 1) for sub in value[:_DETAIL_ITEMS]]
            if len(value) > _DETAIL_ITEMS:
                items.append(f"… {len(value) - _DETAIL_ITEMS} more")
            return items
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__}>"
        return self.text(text)

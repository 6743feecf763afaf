"""Jobs, their statuses and the transition table; pure, no I/O.

Who moves a job between states (each arrow is one guarded SQL statement in
``sql/queries.sql``; the table below is what the tests check them against)::

    queued --claim--> running --all stages done--> succeeded
    running --transient error, attempts left--> queued      (run_at = now + backoff)
    running --retryable error / open circuit--> queued      (attempt refunded, deferrals + 1)
    running --permanent error / attempts exhausted--> dead  (the dead-letter queue)
    running --lease expired (worker died)--> queued, or dead when attempts are exhausted
    running --worker shut down before finishing--> queued   (attempt refunded)
    running --cancel--> cancelled                           (the owning worker stops the run)
    running --lease expired, cancel requested--> cancelled
    queued --cancel--> cancelled          dead --requeue--> queued
    dead --discard--> cancelled           (an operator gave up on it: Queue.discard)

``Queue.cancel`` on a running job moves nothing: it records a cancel request
(``cancel_requested_at``) and tells the owning worker, which stops the run and
writes ``cancel``. While a request stands, an outcome that would queue the job
again (retry, defer, release) is written as ``cancel``, and rescue cancels the
job instead of queueing it (``effective_event``); a ``cancel`` that nobody
requested is written as ``release``.

Every claim sets a fresh random ``lease_token``; every write of that run is fenced
by ``status = 'running' AND lease_token = <the run's token>``. The ``finish``
statement takes the event (a ``Transition`` of ``RUN_EVENTS``), not the status:
it looks the new status up in ``TRANSITIONS``, so a status change the table does
not allow is never written.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from .errors import PayloadError

__all__ = [
    "DEFERRED",
    "REFUNDED",
    "RUN_EVENTS",
    "TRANSITIONS",
    "Job",
    "JobStatus",
    "Transition",
    "check_json",
    "check_label",
    "clean_text",
    "dump_json",
    "dump_json_objects",
    "effective_event",
]


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    #: Waiting to be claimed once ``run_at`` has come; moved in by enqueue, retry, rescue, requeue.
    QUEUED = "queued"
    #: Claimed by one worker under a lease; only that run (its lease token) may move it out.
    RUNNING = "running"
    #: Every stage completed; terminal (pruned by retention).
    SUCCEEDED = "succeeded"
    #: The dead-letter queue: permanent error or attempts exhausted; ``requeue`` brings it back.
    DEAD = "dead"
    #: Cancelled by an operator (queued, or running: its worker stops the run), or
    #: discarded from the dead-letter queue; terminal.
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Transition(enum.StrEnum):
    """The events that move a job."""

    CLAIM = "claim"
    SUCCEED = "succeed"
    RETRY = "retry"  # transient error, attempts left
    DEFER = "defer"  # retryable error / open circuit: attempt refunded
    BURY = "bury"  # permanent error or attempts exhausted
    RESCUE = "rescue"  # lease expired, attempts left
    RESCUE_DEAD = "rescue_dead"  # lease expired, attempts exhausted
    RESCUE_CANCEL = "rescue_cancel"  # lease expired while a cancel was requested
    RELEASE = "release"  # worker shutting down: attempt refunded
    CANCEL = "cancel"
    REQUEUE = "requeue"
    CHECKPOINT = "checkpoint"  # a running job records its stage and state; stays running
    DISCARD = "discard"  # a dead job an operator gave up on


_Q, _R, _S, _D, _C = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SUCCEEDED,
    JobStatus.DEAD,
    JobStatus.CANCELLED,
)

#: (from, event) -> to. Anything not listed is illegal.
TRANSITIONS: Mapping[tuple[JobStatus, Transition], JobStatus] = {
    (_Q, Transition.CLAIM): _R,
    (_R, Transition.SUCCEED): _S,
    (_R, Transition.RETRY): _Q,
    (_R, Transition.DEFER): _Q,
    (_R, Transition.BURY): _D,
    (_R, Transition.RESCUE): _Q,
    (_R, Transition.RESCUE_DEAD): _D,
    (_R, Transition.RESCUE_CANCEL): _C,
    (_R, Transition.RELEASE): _Q,
    (_R, Transition.CANCEL): _C,
    (_R, Transition.CHECKPOINT): _R,
    (_Q, Transition.CANCEL): _C,
    (_D, Transition.REQUEUE): _Q,
    (_D, Transition.DISCARD): _C,
}

#: The events a run writes about itself (its outcomes, through ``finish``); the rest
#: belong to producers, operators and rescue.
RUN_EVENTS: frozenset[Transition] = frozenset(
    {
        Transition.CHECKPOINT,
        Transition.SUCCEED,
        Transition.RETRY,
        Transition.DEFER,
        Transition.BURY,
        Transition.RELEASE,
        Transition.CANCEL,
    }
)
#: Run events that would queue the job again: a standing cancel request turns them into CANCEL.
_REQUEUING: frozenset[Transition] = frozenset(
    {Transition.RETRY, Transition.DEFER, Transition.RELEASE}
)


def effective_event(event: Transition, cancel_requested: bool) -> Transition:
    """The event a run's outcome ``event`` is written as, with or without a standing
    cancel request: a requested cancel wins over anything that would queue the job
    again; a cancel nobody requested releases the job (attempt refunded)."""
    if cancel_requested and event in _REQUEUING:
        return Transition.CANCEL
    if not cancel_requested and event is Transition.CANCEL:
        return Transition.RELEASE
    return event


#: Events that give the attempt back (the run did not count as a try).
REFUNDED: frozenset[Transition] = frozenset({Transition.DEFER, Transition.RELEASE})
#: Events that count a deferral (bounded by ``retry.max_deferrals``).
DEFERRED: frozenset[Transition] = frozenset({Transition.DEFER})


@dataclass(frozen=True, slots=True)
class Job:
    """A read-only snapshot of one job row."""

    id: int
    queue: str
    payload: dict[str, Any]
    status: JobStatus
    stage: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    max_attempts: int = 1
    deferrals: int = 0
    priority: int = 0
    run_at: datetime | None = None
    correlation_id: str = ""
    last_error: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    dedupe_key: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    #: The token of the claim that runs the job now (None unless running).
    lease_token: str | None = None
    #: Error records dropped from the middle of ``errors`` to keep it bounded.
    errors_dropped: int = 0
    #: What the job is (``enqueue(kind=...)``); last, so positional construction keeps working.
    kind: str = "default"
    #: When ``Queue.cancel`` asked the worker running the job to stop it (running jobs only).
    cancel_requested_at: datetime | None = None

    @property
    def attempts_left(self) -> int:
        return max(0, self.max_attempts - self.attempt)

    @classmethod
    def from_claim(cls, row: Sequence[Any], owner: str) -> Job:
        """A job that ``owner`` just claimed, from a row of the claim statements: the
        fields in their order but for status (running), finished_at (none) and
        lease_owner (``owner``), which the database need not send; an empty state or
        error history may come as NULL."""
        # Every claimed job is built here, so the frozen dataclass's __init__ (one
        # object.__setattr__ per field) is bypassed: the slots are set directly
        # (Job's own fields only: a subclass with fields of its own would need more).
        job = _new(cls)
        state, errors = row[4], row[12]
        for put, value in zip(_PUT, (
            row[0], row[1], row[2], JobStatus.RUNNING, row[3], {} if state is None else state,
            row[5], row[6], row[7], row[8], row[9], row[10], row[11],
            [] if errors is None else errors, row[13], row[14], None, row[15], owner,
            row[16], row[17], row[18], row[19], None,
        ), strict=True):  # fmt: skip
            put(job, value)
        return job

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(
            id=row["id"],
            queue=row["queue"],
            payload=row["payload"],
            status=JobStatus(row["status"]),
            stage=row.get("stage"),
            state=row.get("state") or {},
            attempt=row.get("attempt", 0),
            max_attempts=row.get("max_attempts", 1),
            deferrals=row.get("deferrals", 0),
            priority=row.get("priority", 0),
            run_at=row.get("run_at"),
            correlation_id=row.get("correlation_id") or "",
            last_error=row.get("last_error"),
            errors=row.get("errors") or [],
            created_at=row.get("created_at"),
            updated_at=row.get("updated_at"),
            finished_at=row.get("finished_at"),
            dedupe_key=row.get("dedupe_key"),
            lease_owner=row.get("lease_owner"),
            lease_expires_at=row.get("lease_expires_at"),
            lease_token=_text(row.get("lease_token")),
            errors_dropped=row.get("errors_dropped") or 0,
            kind=row.get("kind") or "default",
            cancel_requested_at=row.get("cancel_requested_at"),
        )


_new = object.__new__
#: The slot setters of Job in field order (``from_claim``).
_PUT = tuple(Job.__dict__[f.name].__set__ for f in fields(Job))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# NUL, which PostgreSQL text and jsonb refuse, and UTF-16 surrogates, which UTF-8
# cannot encode: in a Python str every surrogate is a lone one (json.loads('"\\ud83d"')).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD, so PostgreSQL can store it."""
    if "\x00" not in text and text.isascii():
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def _unstorable(text: str) -> bool:
    return "\x00" in text or (not text.isascii() and _UNSTORABLE.search(text) is not None)


def check_label(value: object, what: str, *, max_length: int = 200) -> str:
    """Return ``value`` if it can name a job kind, queue or schedule, else raise.

    A label is a non-blank ``str`` of at most ``max_length`` characters without
    control characters (NUL included) or lone surrogates: it is stored in text
    columns, printed on one line by the command line and used as a metric label.

    Raises:
        TypeError: not a ``str``.
        ValueError: blank, too long, or holding a character it may not.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} must not be blank")
    if len(value) > max_length:
        raise ValueError(f"{what} is {len(value)} characters long, over the limit of {max_length}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} {value[:40]!r} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value[:40]!r} contains a lone surrogate") from None
    return value


def dump_json(value: Any, what: str = "payload", *, max_bytes: int | None = None) -> str:
    """Serialise ``value`` for a jsonb column, or raise ``PayloadError`` naming the bad key.

    PostgreSQL's jsonb refuses NaN/Infinity and the NUL character, and UTF-8 cannot
    encode a lone surrogate, so they are refused here, before any SQL runs.
    """
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        check_json(value, what)  # raises with the path of the offending value
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from exc
    if "\\u0000" in text or _unstorable(text) or _maybe_too_deep(text, _MAX_DEPTH + 1):
        check_json(value, what)
    if max_bytes is not None and len(text) > max_bytes // 4 and len(text.encode()) > max_bytes:
        raise PayloadError(
            f"{what} is {len(text.encode()):,} bytes, over the limit of {max_bytes:,}; "
            "store large data in storage and pass its key",
            size=len(text.encode()),
            limit=max_bytes,
        )
    return text


def dump_json_objects(
    values: Sequence[Mapping[str, Any]],
    label: str = "payloads",
    *,
    max_bytes: int | None = None,
    offset: int = 0,
) -> str:
    """A JSON array of JSON objects, checked like ``dump_json`` item by item.

    One C-level ``json.dumps`` over the whole batch is several times faster than one
    call per item; an item is only serialised on its own to name what is wrong with it.
    """
    items: list[Any] = []
    for i, value in enumerate(values):
        if type(value) is not dict:
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"{label}[{offset + i}] must be a dict (a JSON object), "
                    f"not {type(value).__name__}"
                )
            value = dict(value)
        items.append(value)
    try:
        text = json.dumps(items, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        _name_the_bad_item(items, label, max_bytes, offset)
        raise
    if "\\u0000" in text or _unstorable(text) or _maybe_too_deep(text, _MAX_DEPTH + 2):
        _name_the_bad_item(items, label, max_bytes, offset)
    if max_bytes is not None and len(text) > max_bytes // 4 and len(text.encode()) > max_bytes:
        # Some item may be over the limit: check in slices, one by one only where needed.
        step = 256
        for start in range(0, len(items), step):
            part = items[start : start + step]
            if len(json.dumps(part, ensure_ascii=False).encode()) > max_bytes:
                _name_the_bad_item(part, label, max_bytes, offset + start)
    return text


def _name_the_bad_item(
    items: Sequence[Any], label: str, max_bytes: int | None, offset: int = 0
) -> None:
    for i, item in enumerate(items):
        dump_json(item, f"{label}[{offset + i}]", max_bytes=max_bytes)


_MAX_DEPTH = 200
#: Every byte but the four brackets, for ``bytes.translate(None, delete=...)``.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _maybe_too_deep(text: str, limit: int) -> bool:
    """False when the JSON ``text`` surely nests at most ``limit`` levels; True when
    it may nest deeper (then ``check_json`` decides, on the value).

    json.dumps raises RecursionError on deep values up to Python 3.12 only; from 3.13
    on it serialises them. This runs in C: the brackets are kept (those inside
    strings too: they can only make the answer True), then each pass strips the
    innermost ``{}`` and ``[]`` pairs, at most two levels per pass, so a document
    that empties within ``limit // 2`` passes is at most ``limit`` deep.
    """
    if text.count("{") + text.count("[") <= limit:
        return False
    skeleton = text.encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    for _ in range(limit // 2):
        skeleton = skeleton.replace(b"{}", b"").replace(b"[]", b"")
        if not skeleton:
            return False
    return True


def check_json(value: Any, what: str = "payload") -> None:
    """Walk ``value`` and raise ``PayloadError`` at the first part JSON/jsonb cannot hold."""
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise PayloadError(f"{what} is nested more than {_MAX_DEPTH} levels deep")
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise PayloadError(f"{path} is {item!r}, which JSON cannot hold")
            continue
        if isinstance(item, str):
            if "\x00" in item:
                raise PayloadError(f"{path} contains a NUL character, which PostgreSQL refuses")
            if _unstorable(item):
                raise PayloadError(
                    f"{path} contains a lone UTF-16 surrogate (half of a character), "
                    "which UTF-8 cannot encode"
                )
            continue
        if isinstance(item, Mapping):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise PayloadError(
                        f"{path} has a key {key!r} of type {type(key).__name__}; keys must be str"
                    )
                if _unstorable(key):
                    raise PayloadError(
                        f"{path} has a key containing a NUL character or a lone surrogate"
                    )
                stack.append((sub, f"{path}[{key!r}]", depth + 1))
            continue
        if isinstance(item, list | tuple):
            for i, sub in enumerate(item):
                stack.append((sub, f"{path}[{i}]", depth + 1))
            continue
        raise PayloadError(f"{path} is a {type(item).__name__}, which is not JSON-serialisable")

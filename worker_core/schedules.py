"""Schedules: cron entries every worker evaluates, one job per slot across the fleet.

A ``Schedule`` names a cron expression (croniter's grammar: five fields, or six
with seconds as the sixth), the payload, kind and queue of the job it enqueues,
the IANA time zone the expression is read in, and what happens to slots missed
while no worker ran (``missed``):

- ``"latest"`` (default): run the latest missed slot once;
- ``"all"``: run every missed slot, the latest ``max_catch_up`` of them, oldest first;
- ``"skip"``: run a slot only while it is at most ``SKIP_GRACE`` seconds late.

``ScheduleRunner`` does the evaluating: ``tick(now)`` reads every schedule's last
fired slot, and for each schedule with a slot due fires it with a compare-and-set
on its row (``{schema}.schedules``, migration 8) in the transaction that enqueues
the job, so exactly one worker wins each slot however many evaluate it. Times are
the database clock's unless a test passes ``now``, so hosts whose clocks disagree
still agree on when a slot is due. A schedule seen for the first time starts then:
its first slot is the first one after that moment.

Daylight saving time: a wall-clock time skipped when clocks go forward fires at the
first valid time after it (croniter's rule); a wall-clock time repeated when clocks
go back fires once, at its first occurrence, unless the hour field matches every
hour (``0 * * * *`` keeps firing hourly through the repeated hour).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import PayloadError
from .jobs import check_label, dump_json
from .logs import StructuredLogger
from .redact import redact_text

if TYPE_CHECKING:
    from .queue import Queue

__all__ = [
    "MISSED_POLICIES",
    "SKIP_GRACE",
    "Plan",
    "Schedule",
    "ScheduleRunner",
    "slot_key",
    "start_schedules",
    "validate_schedules",
]

#: What happens to slots missed while no worker ran (see the module docstring).
MISSED_POLICIES = ("latest", "all", "skip")
#: Seconds a slot may be late and still run under ``missed="skip"``.
SKIP_GRACE = 60.0
_MAX_CATCH_UP = 1000
_TICK = timedelta(microseconds=1)


def _croniter(expr: str, start: datetime) -> Any:
    from croniter import croniter  # imported on first use: `import worker_core` stays light

    return croniter(expr, start)


@dataclass(frozen=True)
class Schedule:
    """Enqueue ``payload`` as a job of ``kind`` on ``queue`` at every slot of ``cron``.

    Args:
        name: unique among a worker's schedules; the fleet shares one row per name.
        cron: five fields (minute hour day-of-month month day-of-week), or six with
            seconds as the sixth, or an alias such as ``@hourly``.
        payload: the job's payload (a JSON object).
        kind: the job's kind.
        queue: the queue to enqueue on (default: the worker's ``queue.name``).
        timezone: the IANA zone the expression is read in (``"Europe/Paris"``).
        missed: ``"latest"``, ``"all"`` or ``"skip"`` (see the module docstring).
        max_catch_up: with ``missed="all"``, at most this many missed slots run.

    Raises:
        ValueError, TypeError: naming the schedule and the field, for a bad cron
            expression (or one that never fires), an unknown time zone, a payload
            JSON cannot hold, or a bad name, kind, queue or policy.
    """

    name: str
    cron: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    kind: str = "default"
    queue: str | None = None
    timezone: str = "UTC"
    missed: str = "latest"
    max_catch_up: int = 10

    def __post_init__(self) -> None:
        check_label(self.name, "schedule name")
        what = f"schedule {self.name!r}"
        check_label(self.kind, f"{what}: kind")
        if self.queue is not None:
            check_label(self.queue, f"{what}: queue")
        if not isinstance(self.payload, Mapping):
            raise TypeError(f"{what}: payload must be a dict, not {type(self.payload).__name__}")
        try:
            dump_json(self.payload, f"{what}: payload")
        except PayloadError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "payload", dict(self.payload))
        if self.missed not in MISSED_POLICIES:
            raise ValueError(
                f"{what}: missed must be one of {MISSED_POLICIES}, not {self.missed!r}"
            )
        if (
            isinstance(self.max_catch_up, bool)
            or not isinstance(self.max_catch_up, int)
            or not 1 <= self.max_catch_up <= _MAX_CATCH_UP
        ):
            raise ValueError(f"{what}: max_catch_up must be an int from 1 to {_MAX_CATCH_UP}")
        check_label(self.timezone, f"{what}: timezone", max_length=100)
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{what}: unknown timezone {self.timezone!r}") from None
        object.__setattr__(self, "_zone", zone)
        check_label(self.cron, f"{what}: cron", max_length=200)
        fields = self.cron.split()
        if not (self.cron.startswith("@") or len(fields) in (5, 6)):
            raise ValueError(
                f"{what}: cron {self.cron!r} must have 5 fields (minute hour day month "
                "weekday) or 6 (seconds last)"
            )
        try:
            parsed = _croniter(self.cron, datetime.now(UTC).astimezone(zone))
            parsed.get_next(datetime)
        except Exception as exc:  # croniter's errors: bad syntax, out of range, never fires
            reason = "it never fires" if type(exc).__name__ == "CroniterBadDateError" else exc
            raise ValueError(f"{what}: invalid cron {self.cron!r}: {reason}") from None
        hours = parsed.expanded[1]
        object.__setattr__(self, "_every_hour", hours == ["*"] or len(hours) == 24)

    @property
    def zone(self) -> ZoneInfo:
        zone: ZoneInfo = self.__dict__["_zone"]
        return zone

    def slots(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """The latest ``limit`` slots in ``(after, until]``, oldest first, in UTC."""
        found: list[datetime] = []
        if limit < 1 or until <= after:
            return found
        it = _croniter(self.cron, (until + _TICK).astimezone(self.zone))
        while len(found) < limit:
            slot: datetime = it.get_prev(datetime)
            if slot <= after:
                break
            if not self._repeated(slot):
                found.append(slot.astimezone(UTC))
        found.reverse()
        return found

    def next_runs(self, after: datetime, count: int = 1) -> list[datetime]:
        """The next ``count`` slots strictly after ``after``, in UTC."""
        it = _croniter(self.cron, after.astimezone(self.zone))
        runs: list[datetime] = []
        while len(runs) < count:
            slot: datetime = it.get_next(datetime)
            if not self._repeated(slot):
                runs.append(slot.astimezone(UTC))
        return runs

    def _repeated(self, slot: datetime) -> bool:
        """``slot`` is the second occurrence of a wall time that clocks going back
        repeat, and the schedule does not fire every hour: it already fired once."""
        if self.__dict__["_every_hour"]:
            return False
        naive = slot.replace(tzinfo=None)
        first = naive.replace(tzinfo=self.zone, fold=0).utcoffset()
        second = naive.replace(tzinfo=self.zone, fold=1).utcoffset()
        assert first is not None
        assert second is not None
        # Ambiguous wall times have the larger offset first (PEP 495); gaps the reverse.
        return first > second and slot.utcoffset() == second

    def plan(self, last_slot: datetime, now: datetime) -> Plan:
        """What to fire at ``now`` when slots up to ``last_slot`` are done."""
        keep = self.max_catch_up if self.missed == "all" else 1
        due = self.slots(last_slot, now, keep + 1)  # one more: were any dropped?
        if not due:
            return Plan((), None, 0)
        dropped = max(0, len(due) - keep)
        fire = due[dropped:]
        if self.missed == "skip" and (now - fire[-1]).total_seconds() > SKIP_GRACE:
            return Plan((), due[-1], len(due))
        return Plan(tuple(fire), due[-1], dropped)


@dataclass(frozen=True, slots=True)
class Plan:
    """The slots a tick fires for one schedule, and where its last slot moves."""

    fire: tuple[datetime, ...]
    #: The new last slot; None when nothing is due.
    advance_to: datetime | None
    #: Missed slots left out by the policy (a lower bound when more were missed).
    dropped: int


def slot_key(name: str, slot: datetime) -> str:
    """The dedupe key of a schedule's job for one slot (it names the slot)."""
    return f"schedule:{name}:{slot.astimezone(UTC).isoformat()}"


def validate_schedules(entries: object) -> list[Schedule]:
    """Check what ``schedules()`` returned at worker start; raise naming the problem."""
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise TypeError(f"schedules() must return a list, not {type(entries).__name__}")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, Schedule):
            raise TypeError(f"schedules()[{i}] is a {type(entry).__name__}, not a Schedule")
        if entry.name in seen:
            raise ValueError(f"two schedules are named {entry.name!r}; names must be unique")
        seen.add(entry.name)
    return list(entries)


@dataclass(frozen=True, slots=True)
class Fired:
    """One schedule's slots that a tick enqueued, with the job ids."""

    name: str
    slots: tuple[datetime, ...]
    job_ids: tuple[int, ...]


Sleep = Callable[[float], Awaitable[object]]


class ScheduleRunner:
    """Evaluates a worker's schedules: ``await tick()`` fires what is due, ``run()`` loops.

    Args:
        schedules: validated ``Schedule`` entries.
        queue: an open ``Queue`` (jobs go to ``schedule.queue`` or its default queue).
        max_sleep: the longest ``run()`` sleeps between ticks (it wakes at the next slot).
        sleep: ``asyncio.sleep`` unless a test drives time itself.
    """

    def __init__(
        self,
        schedules: Sequence[Schedule],
        queue: Queue,
        *,
        logger: StructuredLogger | None = None,
        max_sleep: float = 60.0,
        sleep: Sleep | None = None,
    ) -> None:
        from .fleet import ScheduleStore

        self.schedules = validate_schedules(schedules)
        limit = queue.config.queue.max_payload_bytes
        for schedule in self.schedules:  # refused at start rather than at every slot
            try:
                dump_json(schedule.payload, f"schedule {schedule.name!r}: payload", max_bytes=limit)
            except PayloadError as exc:
                raise ValueError(str(exc)) from None
        self._queue = queue
        self._store = ScheduleStore(queue)
        self._log = logger or StructuredLogger("worker_core.schedules")
        self.max_sleep = max_sleep
        self._sleep: Sleep = sleep or asyncio.sleep
        #: The next slot of any schedule after the last tick (None before the first).
        self.next_slot: datetime | None = None
        #: When the last tick ended, on the clock it evaluated (database or given).
        self.last_tick: datetime | None = None

    async def tick(self, now: datetime | None = None) -> list[Fired]:
        """Fire every slot due at ``now`` (default: the database clock); returns what
        this worker fired (slots another worker won are not in it)."""
        if now is not None and now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        names = [s.name for s in self.schedules]
        db_now, last = await self._store.read(names, since=now)
        now = now or db_now
        fired: list[Fired] = []
        for schedule in self.schedules:
            seen = last.get(schedule.name)
            if seen is None:
                continue  # deleted by an operator since: recreated on the next tick
            plan = schedule.plan(seen, now)
            if plan.advance_to is None:
                continue
            ids = await self._fire(schedule, seen, plan)
            if ids is None:
                continue  # another worker fired it first
            if plan.dropped:
                self._log.warning(
                    "missed schedule slots not run",
                    schedule=schedule.name,
                    policy=schedule.missed,
                    dropped=plan.dropped,
                    last_slot=seen.isoformat(),
                )
            if ids:
                fired.append(Fired(schedule.name, plan.fire, tuple(ids)))
                self._log.info(
                    "schedule fired",
                    schedule=schedule.name,
                    slots=[s.isoformat() for s in plan.fire],
                    job_ids=ids,
                )
        self.last_tick = now
        self.next_slot = min((s.next_runs(now)[0] for s in self.schedules), default=None)
        return fired

    async def _fire(self, schedule: Schedule, seen: datetime, plan: Plan) -> list[int] | None:
        assert plan.advance_to is not None
        async with self._queue.connection() as conn, conn.transaction():
            if not await self._store.advance(conn, schedule.name, seen, plan.advance_to):
                return None
            if not plan.fire:
                return []
            ids = await self._queue.enqueue_many(
                [schedule.payload] * len(plan.fire),
                queue=schedule.queue,
                kind=schedule.kind,
                dedupe_keys=[slot_key(schedule.name, slot) for slot in plan.fire],
                connection=conn,
            )
            await self._store.fired(conn, schedule.name, ids[-1])
        return ids

    def seconds_to_next(self) -> float:
        """How long ``run()`` sleeps after a tick: until the next slot, within bounds."""
        if self.next_slot is None or self.last_tick is None:
            return self.max_sleep
        wait = (self.next_slot - self.last_tick).total_seconds() + 0.005
        return min(max(wait, 0.001), self.max_sleep)

    async def run(self) -> None:
        """Tick at every slot until cancelled; a failed tick is logged and retried."""
        error_delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await self.tick()
                wait = self.seconds_to_next() - (time.monotonic() - started)
                error_delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning(
                    "evaluating schedules failed; retrying",
                    error=redact_text(str(exc))[:300],
                    error_type=type(exc).__name__,
                    retry_in=error_delay,
                )
                wait, error_delay = error_delay, min(error_delay * 2, 30.0)
            await self._sleep(max(wait, 0.001) if math.isfinite(wait) else self.max_sleep)


def start_schedules(
    schedules: Sequence[Schedule], queue: Queue, logger: StructuredLogger | None = None
) -> list[asyncio.Task[None]]:
    """The worker's entry point: a task running a ``ScheduleRunner`` (none without
    schedules), to cancel when the worker stops."""
    if not schedules:
        return []
    runner = ScheduleRunner(schedules, queue, logger=logger)
    return [asyncio.create_task(runner.run(), name="worker_core.schedules")]

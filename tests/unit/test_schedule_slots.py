"""Schedule: validation, slots, missed-slot policies and daylight saving time, on a fake clock."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_core import Schedule
from worker_core.schedules import SKIP_GRACE, slot_key, validate_schedules

T0 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"cron": "61 * * * *"}, ValueError, "schedule 'job': invalid cron '61 \\* \\* \\* \\*'"),
        ({"cron": "every hour"}, ValueError, "must have 5 fields"),
        ({"cron": "0 0 1 1 * 0 2030"}, ValueError, "must have 5 fields"),
        ({"cron": "0 0 31 2 *"}, ValueError, "it never fires"),
        ({"cron": ""}, ValueError, "cron must not be blank"),
        ({"cron": "0 * * * *\x00"}, ValueError, "control characters"),
        ({"timezone": "Mars/Olympus_Mons"}, ValueError, "unknown timezone 'Mars/Olympus_Mons'"),
        ({"timezone": "../../etc/passwd"}, ValueError, "unknown timezone"),
        ({"timezone": "/usr/share/zoneinfo/UTC"}, ValueError, "unknown timezone"),
        ({"payload": {"x": math.nan}}, ValueError, "schedule 'job': payload\\['x'\\] is nan"),
        ({"payload": {"x": {1, 2}}}, ValueError, "not JSON-serialisable"),
        ({"payload": {"x": "a\x00"}}, ValueError, "NUL"),
        ({"payload": ["not", "a", "dict"]}, TypeError, "payload must be a dict"),
        ({"missed": "never"}, ValueError, "missed must be one of"),
        ({"max_catch_up": 0}, ValueError, "max_catch_up must be an int from 1"),
        ({"max_catch_up": True}, ValueError, "max_catch_up"),
        ({"kind": ""}, ValueError, "schedule 'job': kind must not be blank"),
        ({"kind": "x\ud800"}, ValueError, "lone surrogate"),
        ({"queue": "q\n"}, ValueError, "schedule 'job': queue"),
        ({"name": " "}, ValueError, "schedule name must not be blank"),
        ({"name": 3}, TypeError, "schedule name must be a str"),
    ],
)
def test_a_bad_schedule_is_refused_naming_it(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    fields: dict[str, Any] = {"name": "job", "cron": "0 * * * *", "payload": {}, **kwargs}
    with pytest.raises(error, match=message):
        Schedule(fields.pop("name"), fields.pop("cron"), fields.pop("payload"), **fields)


def test_validate_schedules_refuses_duplicates_and_strangers() -> None:
    a = Schedule("a", "0 * * * *", {})
    assert validate_schedules([a]) == [a]
    assert validate_schedules(()) == []
    with pytest.raises(ValueError, match="two schedules are named 'a'"):
        validate_schedules([a, Schedule("a", "5 * * * *", {})])
    with pytest.raises(TypeError, match=r"schedules\(\)\[1\] is a dict"):
        validate_schedules([a, {"name": "b"}])
    with pytest.raises(TypeError, match="must return a list"):
        validate_schedules("a")


def test_the_payload_is_copied() -> None:
    payload = {"bucket": "docs"}
    schedule = Schedule("a", "0 * * * *", payload)
    payload["bucket"] = "changed"
    assert schedule.payload == {"bucket": "docs"}


def test_slots_and_next_runs() -> None:
    hourly = Schedule("h", "0 * * * *", {})
    assert hourly.slots(T0, T0 + timedelta(hours=3, minutes=1), 10) == [
        T0 + timedelta(hours=h) for h in (1, 2, 3)
    ]
    # The window is (after, until]: a slot at `until` is due, one at `after` is done.
    assert hourly.slots(T0, T0 + timedelta(hours=1), 10) == [T0 + timedelta(hours=1)]
    assert hourly.slots(T0, T0, 10) == []
    assert hourly.slots(T0, T0 + timedelta(hours=5), 2) == [
        T0 + timedelta(hours=4),
        T0 + timedelta(hours=5),
    ]
    assert hourly.next_runs(T0, 2) == [T0 + timedelta(hours=1), T0 + timedelta(hours=2)]
    seconds = Schedule("s", "* * * * * */10", {})  # croniter: seconds are the sixth field
    assert seconds.next_runs(T0, 3) == [T0 + timedelta(seconds=s) for s in (10, 20, 30)]
    assert slot_key("h", T0) == "schedule:h:2030-01-01T10:00:00+00:00"


def test_a_timezone_shifts_the_slots() -> None:
    paris = Schedule("p", "0 9 * * *", {}, timezone="Europe/Paris")
    assert paris.next_runs(T0) == [datetime(2030, 1, 2, 8, 0, tzinfo=UTC)]  # 09:00 CET


def fire_through(
    schedule: Schedule, start: datetime, end: datetime, step: timedelta
) -> list[datetime]:
    """What a worker ticking every ``step`` from ``start`` to ``end`` fires."""
    last, now = start, start
    fired: list[datetime] = []
    while now <= end:
        plan = schedule.plan(last, now)
        fired += plan.fire
        if plan.advance_to is not None:
            last = plan.advance_to
        now += step
    return fired


NEW_YORK = ZoneInfo("America/New_York")


def local_day(year: int, month: int, day: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, day, tzinfo=NEW_YORK).astimezone(UTC)
    end = (datetime(year, month, day, tzinfo=NEW_YORK) + timedelta(days=1)).astimezone(UTC)
    return start - timedelta(seconds=1), end - timedelta(seconds=1)


def test_spring_forward_day() -> None:
    # 2024-03-10, New York: 02:00 EST becomes 03:00 EDT, so 02:30 never happens.
    start, end = local_day(2024, 3, 10)
    minute = timedelta(minutes=1)
    daily = fire_through(
        Schedule("d", "30 2 * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert [t.astimezone(NEW_YORK).isoformat() for t in daily] == ["2024-03-10T03:00:00-04:00"]
    hourly = fire_through(
        Schedule("h", "0 * * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert len(hourly) == 23  # the day is 23 hours long
    assert len(set(hourly)) == 23
    other = fire_through(
        Schedule("o", "30 3 * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert [t.astimezone(NEW_YORK).hour for t in other] == [3]


def test_fall_back_day() -> None:
    # 2024-11-03, New York: 02:00 EDT becomes 01:00 EST, so 01:00-01:59 happens twice.
    start, end = local_day(2024, 11, 3)
    minute = timedelta(minutes=1)
    daily = fire_through(
        Schedule("d", "30 1 * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert [t.astimezone(NEW_YORK).isoformat() for t in daily] == ["2024-11-03T01:30:00-04:00"]
    hourly = fire_through(
        Schedule("h", "0 * * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert len(hourly) == 25  # the day is 25 hours long, and an hourly job runs each hour
    half = fire_through(
        Schedule("m", "*/30 * * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert len(half) == 50
    assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(half))
    ranged = fire_through(
        Schedule("r", "15 1-2 * * *", {}, timezone="America/New_York"), start, end, minute
    )
    assert [t.astimezone(NEW_YORK).strftime("%H:%M%z") for t in ranged] == [
        "01:15-0400",
        "02:15-0500",
    ]


def test_missed_slot_policies() -> None:
    hourly: dict[str, Any] = {"name": "h", "cron": "0 * * * *", "payload": {}}
    now = T0 + timedelta(hours=5, minutes=30)  # down from 10:00 to 15:30: 5 slots missed
    latest = Schedule(**hourly).plan(T0, now)
    assert latest.fire == (T0 + timedelta(hours=5),)
    assert latest.advance_to == T0 + timedelta(hours=5)
    assert latest.dropped == 1  # at least one more was missed
    every = Schedule(**hourly, missed="all").plan(T0, now)
    assert every.fire == tuple(T0 + timedelta(hours=h) for h in range(1, 6))
    assert every.dropped == 0
    capped = Schedule(**hourly, missed="all", max_catch_up=3).plan(T0, now)
    assert capped.fire == tuple(T0 + timedelta(hours=h) for h in (3, 4, 5))
    assert capped.advance_to == T0 + timedelta(hours=5)
    assert capped.dropped == 1
    skip = Schedule(**hourly, missed="skip")
    late = skip.plan(T0, now)
    assert late.fire == ()
    assert late.advance_to == T0 + timedelta(hours=5)  # nothing runs, and it moves on
    on_time = skip.plan(T0 + timedelta(hours=4), T0 + timedelta(hours=5, seconds=SKIP_GRACE))
    assert on_time.fire == (T0 + timedelta(hours=5),)
    nothing = Schedule(**hourly).plan(T0, T0 + timedelta(minutes=59))
    assert (nothing.fire, nothing.advance_to) == ((), None)


CRONS = ["*/7 * * * *", "0 * * * *", "30 1 * * *", "15 1-3 * * *", "0 */5 * * 1-5", "*/20 1 * * *"]
ZONES = ["UTC", "America/New_York", "Europe/Paris", "Australia/Lord_Howe", "Asia/Kolkata"]


@settings(max_examples=150, deadline=None)
@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(ZONES),
    start=st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC)
    ),
    hours=st.floats(min_value=0, max_value=72),
    cap=st.integers(min_value=1, max_value=50),
)
def test_slots_backwards_agree_with_next_runs_forwards(
    cron: str, zone: str, start: datetime, hours: float, cap: int
) -> None:
    schedule = Schedule("p", cron, {}, timezone=zone)
    until = start + timedelta(hours=hours)
    forward: list[datetime] = []
    cursor = start
    while True:
        (cursor,) = schedule.next_runs(cursor)
        if cursor > until:
            break
        forward.append(cursor)
    assert schedule.slots(start, until, cap) == forward[-cap:]
    assert all(a < b for a, b in itertools.pairwise(forward))
    plan = schedule.plan(start, until)
    assert plan.fire == tuple(forward[-1:])
    assert plan.advance_to == (forward[-1] if forward else None)

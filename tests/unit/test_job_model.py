"""Pure parts of the job model: cancel requests in the transition table, the rendered
finish table, operator commands on the control channel, pipelines validation."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core import WorkerConfig
from worker_core._notifier import Notifier
from worker_core.jobs import (
    DEFERRED,
    REFUNDED,
    RUN_EVENTS,
    TRANSITIONS,
    JobStatus,
    Transition,
    effective_event,
)
from worker_core.queue import Queue, control_channel_name, done_channel_name
from worker_core.stages import validate_pipelines

R = JobStatus.RUNNING


def test_a_cancel_request_wins_over_everything_that_would_queue_the_job_again() -> None:
    assert TRANSITIONS[(R, Transition.RESCUE_CANCEL)] is JobStatus.CANCELLED
    assert TRANSITIONS[(R, Transition.CANCEL)] is JobStatus.CANCELLED
    requested = {event: effective_event(event, True) for event in RUN_EVENTS}
    assert requested == {
        Transition.CHECKPOINT: Transition.CHECKPOINT,  # the run goes on until it is stopped
        Transition.SUCCEED: Transition.SUCCEED,  # finished first: the work is done
        Transition.BURY: Transition.BURY,
        Transition.RETRY: Transition.CANCEL,
        Transition.DEFER: Transition.CANCEL,
        Transition.RELEASE: Transition.CANCEL,
        Transition.CANCEL: Transition.CANCEL,
    }
    unrequested = {event: effective_event(event, False) for event in RUN_EVENTS}
    assert unrequested[Transition.CANCEL] is Transition.RELEASE  # nobody asked: back it goes
    assert all(unrequested[e] is e for e in RUN_EVENTS if e is not Transition.CANCEL)


@given(st.sampled_from(sorted(RUN_EVENTS)), st.booleans())
def test_every_effective_event_is_a_legal_move_from_running(event: Transition, asked: bool) -> None:
    actual = effective_event(event, asked)
    assert (R, actual) in TRANSITIONS and actual in RUN_EVENTS


def test_the_rendered_finish_table_follows_effective_event() -> None:
    from worker_core._statements import _transitions

    text = _transitions().as_string(None)
    # One row per event: ('running', 'event', ARRAY[to, to'], ARRAY[refund, refund'],
    # ARRAY[deferral, deferral']); the first of each pair without, the second with a
    # standing cancel request.
    row = re.compile(
        r"\('(\w+)', '(\w+)', ARRAY\['(\w+)', '(\w+)'\], "
        r"ARRAY\[(\d), (\d)\], ARRAY\[(\d), (\d)\]\)"
    )
    found = row.findall(text)
    assert text == "(VALUES " + ", ".join(m.group(0) for m in row.finditer(text)) + ")"
    table: dict[tuple[Transition, bool], tuple[str, int, int]] = {}
    for source, event, to, to_asked, refund, refund_asked, deferral, deferral_asked in found:
        assert source == "running"
        table[(Transition(event), False)] = (to, int(refund), int(deferral))
        table[(Transition(event), True)] = (to_asked, int(refund_asked), int(deferral_asked))
    assert len(found) == len(RUN_EVENTS)
    assert len(table) == 2 * len(RUN_EVENTS)
    for (event, asked), got in table.items():
        actual = effective_event(event, asked)
        assert got == (
            TRANSITIONS[(R, actual)].value,
            int(actual in REFUNDED),
            int(actual in DEFERRED),
        )


def test_channel_names_fit_postgres_identifiers() -> None:
    for name in (control_channel_name, done_channel_name):
        assert name("worker_core").startswith("worker_core_worker_core_")
        long = name("s" * 63)
        assert len(long) <= 63 and long != name("t" * 63)


class Commands:
    def __init__(self) -> None:
        self.cancelled: list[int] = []
        self.paused: list[tuple[list[str], bool]] = []


def notifier(commands: Commands) -> Notifier:
    config = WorkerConfig()
    from worker_core.logs import StructuredLogger

    return Notifier(
        config,
        Queue(config),
        StructuredLogger("test"),
        on_work=lambda: None,
        on_breaker_trip=lambda: None,
        on_cancel=commands.cancelled.append,
        on_pause=lambda queues, paused: commands.paused.append((queues, paused)),
        rng=random.Random(0),
    )


def test_operator_commands_are_read_and_anything_else_ignored() -> None:
    commands = Commands()
    n = notifier(commands)
    n._control('{"op": "cancel", "id": 42}')
    n._control('{"op": "pause", "queue": "docs"}')
    n._control('{"op": "resume", "queue": "docs"}')
    for junk in (
        "",
        "not json",
        "[]",
        "null",
        '{"op": "cancel"}',
        '{"op": "cancel", "id": "42"}',
        '{"op": "cancel", "id": true}',
        '{"op": "cancel", "id": 1e400}',
        '{"op": "pause", "queue": 7}',
        '{"op": "drop table"}',
        '{"id": 1}',
        '"\\ud800"',
        "{" * 10_000,
    ):
        n._control(junk)
    assert commands.cancelled == [42]
    assert commands.paused == [(["docs"], True), (["docs"], False)]


@given(st.text(max_size=200))
def test_no_control_payload_raises(payload: str) -> None:
    notifier(Commands())._control(payload)


@pytest.mark.parametrize(
    ("pipelines", "error", "message"),
    [
        (None, TypeError, "must return a dict"),
        ({}, ValueError, "no kinds"),
        ({k: [] for k in map(str, range(101))}, ValueError, "at most 100"),
        ({1: []}, TypeError, "must be a str"),
        ({"a\ud800": []}, ValueError, "lone surrogate"),
    ],
)
def test_pipelines_are_checked(pipelines: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        validate_pipelines(pipelines)


def test_kinds_may_share_stage_objects() -> None:
    class Stage:
        name = "s"

        async def run(self, ctx: Any) -> None:
            return None

    shared = Stage()
    checked = validate_pipelines({"a": [shared], "b": [shared]})
    assert checked["a"][0] is checked["b"][0] is shared

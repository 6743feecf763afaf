"""Outcomes and error records: named constructors, sanitising and bounds; pure.

And the shape core v2 promises: BaseWorker is a small façade, and no private
component (nor stages.py) imports the module that composes it.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core import BaseWorker, Job, JobStatus, WorkerConfig
from worker_core.errors import PermanentError, RetryableError, TransientError
from worker_core.jobs import RUN_EVENTS, TRANSITIONS, Transition, clean_text, dump_json
from worker_core.outcomes import (
    MAX_DELAY_SECONDS,
    MAX_DETAIL_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    after_failure,
    bury,
    bury_unstorable,
    cancel,
    checkpoint,
    defer,
    error_json,
    error_record,
    finite_delay,
    release,
    retry,
    succeed,
)
from worker_core.queue import outcomes_json
from worker_core.retry import ErrorKind

PACKAGE = Path(__file__).resolve().parents[2] / "worker_core"

#: Any text, lone surrogates and NUL included (the default alphabet leaves them out).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()))
DETAIL_VALUES = st.recursive(
    ANY_TEXT | st.floats() | st.integers() | st.none() | st.booleans(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(ANY_TEXT, c, max_size=3),
    max_leaves=10,
)


def claimed(**kw: Any) -> Job:
    fields: dict[str, Any] = {
        "id": 7, "queue": "q", "payload": {}, "status": JobStatus.RUNNING, "attempt": 2,
        "max_attempts": 3, "lease_token": "0b8f6c1e-3a57-4d5e-9d8e-2a0c3c1f4b11",
    }  # fmt: skip
    return Job(**{**fields, **kw})


def test_each_constructor_names_its_event_and_the_table_allows_it() -> None:
    job = claimed()
    made = [
        checkpoint(job, stage="a", state="{}"),
        succeed(job, stage="a", state=None),
        retry(job, stage="a", state=None, delay=1.5, error="{}"),
        defer(job, stage="a", state=None, delay=0.0, error="{}"),
        bury(job, stage="a", state=None, error="{}"),
        release(job, stage="a", state=None),
        cancel(job, stage="a", state=None),
    ]
    assert {o.event for o in made} == RUN_EVENTS
    for outcome in made:
        assert (JobStatus.RUNNING, outcome.event) in TRANSITIONS
        assert (outcome.job_id, outcome.token, outcome.attempt) == (7, job.lease_token, 2)
    assert [o.terminal for o in made] == [False] + [True] * 6


def test_constructors_refuse_unclaimed_jobs_and_delays_that_are_not_finite() -> None:
    with pytest.raises(ValueError, match="no lease token"):
        succeed(claimed(lease_token=None), stage=None, state=None)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite number of seconds"):
            retry(claimed(), stage=None, state=None, delay=bad, error="{}")
    assert retry(claimed(), stage=None, state=None, delay=-3, error="{}").delay == 0.0
    assert defer(claimed(), stage=None, state=None, delay=1e12, error="{}").delay == (
        MAX_DELAY_SECONDS
    )


def test_the_finish_batch_is_named_fields_not_positions() -> None:
    job = claimed()
    text = outcomes_json([checkpoint(job, stage='é"x', state='{"k": [1]}')])
    assert json.loads(text) == [
        {"id": 7, "token": job.lease_token, "event": "checkpoint", "stage": 'é"x',
         "state": {"k": [1]}, "delay": None, "error": None},
    ]  # fmt: skip
    with pytest.raises(ValueError, match="must be finite"):
        outcomes_json([release(job, stage=None, state=None).__class__(7, "t", 1,
                       Transition.RETRY, None, None, math.nan, "{}")])  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "attempt", "deferrals", "event", "stored_kind", "note"),
    [
        (ErrorKind.TRANSIENT, 1, 0, Transition.RETRY, "transient", None),
        (ErrorKind.TRANSIENT, 3, 0, Transition.BURY, "transient", "attempts exhausted (3)"),
        (ErrorKind.RETRYABLE, 3, 0, Transition.DEFER, "retryable", None),
        (ErrorKind.RETRYABLE, 1, 2, Transition.RETRY, "transient", "deferral limit 2 reached"),
        (ErrorKind.PERMANENT, 1, 0, Transition.BURY, "permanent", None),
    ],
)
def test_after_failure_follows_the_plan_and_stores_it(
    kind: ErrorKind,
    attempt: int,
    deferrals: int,
    event: Transition,
    stored_kind: str,
    note: str | None,
) -> None:
    job = claimed(attempt=attempt, deferrals=deferrals)
    record = error_record(RuntimeError("x"), kind=kind, stage="s", attempt=attempt, worker_id="w")
    outcome, plan = after_failure(
        job, kind, max_deferrals=2, stage="s", state=None, delay=0.5, record=record
    )
    assert outcome.event is plan.transition is event
    assert outcome.error is not None
    stored = json.loads(outcome.error)
    assert stored["kind"] == stored_kind and stored.get("note") == note
    assert (outcome.delay is None) == (event is Transition.BURY)


def test_an_error_record_is_clean_redacted_and_bounded() -> None:
    secret = "Hunter2-secret-value"
    exc = TransientError(
        "bad\x00header " + "m" * 50_000 + f" password={secret}",
        body="b" * (3 << 20),
        nested={"deep": [[[[[[[[[["x"]]]]]]]]]]},
        key=f"postgresql://u:{secret}@h/db",
        weird=object(),
        huge=10**5000,
        nan=math.nan,
    )
    record = error_record(
        exc, kind=ErrorKind.TRANSIENT, stage="s", attempt=1, worker_id="w", secrets=[secret]
    )
    text = error_json(record)
    assert secret not in text and "\x00" not in text
    assert len(record["message"]) == MAX_MESSAGE_CHARS
    assert record["message"].startswith("bad\ufffdheader mmm")
    assert record["truncated"]["message"] == len(str(exc))
    assert record["truncated"]["detail"] > 3 << 20
    assert len(record["detail"].encode()) <= MAX_DETAIL_BYTES
    assert len(record["traceback"]) <= MAX_TRACEBACK_CHARS
    assert len(text.encode()) < 4 * (MAX_MESSAGE_CHARS + MAX_TRACEBACK_CHARS) + MAX_DETAIL_BYTES
    dump_json(json.loads(text), "record")  # storable in jsonb


def test_small_details_are_kept_as_they_are() -> None:
    exc = RetryableError("429", retry_after=2.5, status=429, headers={"x-id": "a"})
    record = error_record(exc, kind=ErrorKind.RETRYABLE, stage=None, attempt=1, worker_id="w")
    assert record["detail"] == {"status": 429, "headers": {"x-id": "a"}}
    assert record["retry_after"] == 2.5 and "truncated" not in record
    assert set(record) >= {"type", "message", "stage", "attempt", "kind", "at", "worker"}


def test_an_exception_whose_str_fails_still_gets_a_record() -> None:
    class Rude(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    record = error_record(Rude(), kind=ErrorKind.TRANSIENT, stage=None, attempt=1, worker_id="w")
    assert record["message"] == "<Rude: str() failed>"


def test_retry_after_that_is_not_a_finite_number_means_backoff() -> None:
    assert RetryableError(retry_after=math.nan).retry_after is None
    assert RetryableError(retry_after=math.inf).retry_after is None
    assert RetryableError(retry_after="soon").retry_after is None  # type: ignore[arg-type]
    assert RetryableError(retry_after=-4).retry_after == 0.0
    assert RetryableError(retry_after=3).retry_after == 3.0


def test_an_unstorable_outcome_becomes_a_dead_letter_that_says_why() -> None:
    original = succeed(claimed(), stage="embed", state='{"t": "\ud83d"}')
    dead = bury_unstorable(
        original, UnicodeEncodeError("utf-8", "\ud83d", 0, 1, "surrogates not allowed"),
        worker_id="w",
    )  # fmt: skip
    assert (dead.event, dead.token, dead.state, dead.stage) == (
        Transition.BURY, original.token, None, "embed",
    )  # fmt: skip
    assert dead.error is not None
    record = json.loads(dead.error)
    assert record["type"] == "UnstorableOutcome" and record["kind"] == "permanent"
    assert "result of attempt 2 could not be stored (UnicodeEncodeError" in record["message"]
    assert "succeed outcome" in record["note"]


@given(ANY_TEXT)
def test_clean_text_always_encodes(text: str) -> None:
    cleaned = clean_text(text)
    cleaned.encode("utf-8")
    assert "\x00" not in cleaned and len(cleaned) == len(text)


@given(st.one_of(st.floats(), st.integers(), st.none(), st.text(), st.booleans()))
def test_finite_delay_is_none_or_within_bounds(value: Any) -> None:
    delay = finite_delay(value)
    assert delay is None or 0.0 <= delay <= MAX_DELAY_SECONDS


@given(ANY_TEXT, st.lists(DETAIL_VALUES, max_size=5), ANY_TEXT)
def test_property_any_error_gives_a_storable_bounded_record(
    message: str, detail: list[Any], stage: str
) -> None:
    exc = PermanentError(message, **{f"d{i}": v for i, v in enumerate(detail)})
    record = error_record(exc, kind=ErrorKind.PERMANENT, stage=stage, attempt=1, worker_id="w")
    text = error_json(record)
    assert len(text.encode("utf-8")) < 64 * 1024
    dump_json(json.loads(text), "record")


# -- the façade and the direction of imports -----------------------------------------------
class Minimal(BaseWorker):
    def stages(self) -> list[Any]:
        return []


def test_base_worker_is_a_small_facade() -> None:
    public = {name for name in dir(Minimal(WorkerConfig())) if not name.startswith("_")}
    assert public == {
        # what users implement or override
        "stages", "pipelines", "classify", "retry_delay", "on_startup", "on_shutdown", "on_job_done",
        "on_dead_letter", "on_cancelled", "required_breakers", "schedules",
        # what callers use
        "run", "stop", "health", "snapshot", "metrics", "worker_id", "config", "logger",
        # services for the subclass and its stages
        "connection", "breaker", "rate_limiter", "add_health_check",
    }  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update({node.module or ""} | {f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.removeprefix("worker_core."))
    return found


def test_no_private_component_imports_the_facade() -> None:
    private = sorted(p for p in PACKAGE.glob("_*.py") if p.name != "__init__.py")
    assert {p.stem for p in private} >= {
        "_runtime", "_dispatch", "_executor", "_completer", "_maintenance", "_notifier",
        "_watchdog",
    }  # fmt: skip
    for path in [*private, *(PACKAGE / f"{m}.py" for m in ("stages", "health", "metrics"))]:
        assert "worker" not in _imports(path), f"{path.name} imports worker.py"
    # One direction: runtime -> dispatch -> executor -> completer, never back up.
    order = ["_runtime", "_dispatch", "_executor", "_completer"]
    for i, name in enumerate(order):
        later = _imports(PACKAGE / f"{name}.py")
        assert not later & set(order[:i]), f"{name} imports a component above it"

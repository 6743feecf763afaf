"""Job, JobStatus, the transition table and JSON checks; pure."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core.errors import PayloadError, PermanentError
from worker_core.jobs import TRANSITIONS, Job, JobStatus, Transition, check_json, dump_json


def test_status_values() -> None:
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "dead", "cancelled"]
    assert JobStatus("dead") is JobStatus.DEAD
    assert str(JobStatus.RUNNING) == "running"
    assert isinstance(JobStatus.QUEUED, str)


def test_transition_table_matches_the_state_machine() -> None:
    q, r, s, d, c = (
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
        JobStatus.DEAD,
        JobStatus.CANCELLED,
    )
    assert TRANSITIONS[(q, Transition.CLAIM)] is r
    assert TRANSITIONS[(r, Transition.SUCCEED)] is s
    assert TRANSITIONS[(r, Transition.RETRY)] is q
    assert TRANSITIONS[(r, Transition.DEFER)] is q
    assert TRANSITIONS[(r, Transition.BURY)] is d
    assert TRANSITIONS[(r, Transition.RESCUE)] is q
    assert TRANSITIONS[(r, Transition.RESCUE_DEAD)] is d
    assert TRANSITIONS[(q, Transition.CANCEL)] is c
    assert TRANSITIONS[(d, Transition.REQUEUE)] is q
    assert TRANSITIONS[(d, Transition.DISCARD)] is c
    # Terminal states have no way out but requeue of dead.
    assert not [k for k in TRANSITIONS if k[0] in (s, c)]


def test_job_from_row_defaults() -> None:
    job = Job.from_row({"id": 1, "queue": "q", "payload": {"a": 1}, "status": "queued"})
    assert job.status is JobStatus.QUEUED
    assert job.state == {}
    assert job.errors == []
    with pytest.raises(AttributeError):
        job.status = JobStatus.DEAD  # type: ignore[misc]


def test_job_from_claim_is_the_constructors_job() -> None:
    """from_claim sets the slots itself: the same Job as the constructor's, still
    frozen, with a fresh state dict and error list where the claim sent NULL."""
    t = datetime(2026, 1, 2, tzinfo=UTC)
    row = [7, "q", {"p": 1}, "parse", None, 2, 5, 1, 3, t, "cid", None, None, t, t, "k", t,
           "tok", 0, "pdf"]  # fmt: skip
    job = Job.from_claim(row, "w1")
    assert job == Job(
        7, "q", {"p": 1}, JobStatus.RUNNING, "parse", {}, 2, 5, 1, 3, t, "cid", None, [], t, t,
        None, "k", "w1", t, "tok", 0, "pdf", None,
    )  # fmt: skip
    assert job.state is not Job.from_claim(row, "w1").state  # one dict per job
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.attempt = 3  # type: ignore[misc]
    stored = [*row]
    stored[4], stored[11], stored[12] = {"a": 1}, {"type": "E"}, [{"type": "E"}]
    again = Job.from_claim(stored, "w1")
    assert (again.state, again.last_error, again.errors) == (
        {"a": 1},
        {"type": "E"},
        [{"type": "E"}],
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"a": {"b": object()}}, "payload['a']['b'] is a object"),
        ({"a": [1, float("nan")]}, "payload['a'][1] is nan"),
        ({"a": math.inf}, "payload['a'] is inf"),
        ({"text": "nul\x00byte"}, "payload['text'] contains a NUL"),
        ({"b": b"bytes"}, "payload['b'] is a bytes"),
        ({"s": {1, 2}}, "payload['s'] is a set"),
    ],
)
def test_dump_json_names_the_key(value: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PayloadError) as info:
        dump_json(value)
    assert fragment in str(info.value)
    assert isinstance(info.value, PermanentError)
    assert isinstance(info.value, ValueError)


def test_deep_nesting_is_refused_clearly() -> None:
    value: dict[str, Any] = {}
    cursor = value
    for _ in range(5000):
        cursor["a"] = {}
        cursor = cursor["a"]
    with pytest.raises(PayloadError, match="nested more than"):
        dump_json(value)


def test_size_limit() -> None:
    with pytest.raises(PayloadError, match="over the limit"):
        dump_json({"x": "y" * 5000}, max_bytes=4096)
    assert dump_json({"x": "y"}, max_bytes=4096) == '{"x":"y"}'


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda t: "\x00" not in t),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text().filter(lambda t: "\x00" not in t), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text().filter(lambda t: "\x00" not in t), json_values, max_size=5))
def test_property_valid_json_round_trips(value: dict[str, Any]) -> None:
    import json

    check_json(value)
    assert json.loads(dump_json(value)) == value


# -- deep nesting on every Python (json.dumps no longer refuses it from 3.13 on) --------
def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_nested_json = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(alphabet='{}[]"\\ab', max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@given(_nested_json, st.integers(0, 12))
def test_property_deep_documents_are_never_missed(value: object, limit: int) -> None:
    import json

    from worker_core.jobs import _maybe_too_deep

    found = _maybe_too_deep(json.dumps(value, ensure_ascii=False), limit)
    depth = _depth(value)
    if depth > limit:
        assert found  # never a false negative: check_json then decides
    elif depth <= limit // 2 and '"' not in json.dumps(value).replace('\\"', ""):
        assert not found


def test_deep_nesting_refused_in_batches_too() -> None:
    from worker_core.jobs import dump_json_objects

    deep: dict[str, object] = {"leaf": True}
    for _ in range(300):
        deep = {"n": deep}
    with pytest.raises(PayloadError, match=r"payloads\[1\] is nested more than"):
        dump_json_objects([{"ok": 1}, deep])

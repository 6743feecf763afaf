"""Producer argument checks (worker_core._inputs): accepted exactly when finite and in range."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from worker_core._inputs import (
    MAX_DEDUPE_KEY_BYTES,
    MAX_RUN_AT_SECONDS,
    float_param,
    int_param,
    run_at_params,
    text_param,
)

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
)


@given(NUMBERS)
@example(math.inf)
@example(-math.inf)
@example(math.nan)
@example(10**400)
@example(MAX_RUN_AT_SECONDS)
@example(MAX_RUN_AT_SECONDS + 1)
def test_property_seconds_accepted_iff_finite_and_within_a_century(seconds: float) -> None:
    ok = isinstance(seconds, int | float) and abs(seconds) <= MAX_RUN_AT_SECONDS
    try:
        params = run_at_params(seconds)
    except ValueError as exc:
        assert not ok or math.isnan(seconds), seconds
        assert "run_at" in str(exc)
    else:
        assert ok and math.isfinite(params["delay"]) and params["run_at"] is None


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-11))])))
def test_property_datetimes_accepted_iff_within_a_century(when: datetime) -> None:
    distance = abs((when - datetime.now(UTC)).total_seconds())
    try:
        params = run_at_params(when)
    except ValueError as exc:
        assert distance > MAX_RUN_AT_SECONDS - 5, when  # 5 s of clock between the two reads
        assert "100 years" in str(exc)
    else:
        assert distance <= MAX_RUN_AT_SECONDS + 5 and params["run_at"] == when


@given(st.timedeltas())
def test_property_timedeltas(delta: timedelta) -> None:
    try:
        params = run_at_params(delta)
    except ValueError:
        assert abs(delta.total_seconds()) > MAX_RUN_AT_SECONDS
    else:
        assert params["delay"] == delta.total_seconds()


@given(st.one_of(NUMBERS, st.booleans(), st.text(max_size=3), st.none()))
def test_property_int_param(value: Any) -> None:
    try:
        got = int_param(value, "priority")
    except (TypeError, ValueError) as exc:
        assert "priority" in str(exc)
        assert isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**31 - 1
    else:
        assert got == value and -(2**31) <= got < 2**31


@given(NUMBERS)
def test_property_float_param(value: float) -> None:
    try:
        got = float_param(value, "lease_seconds", minimum=0.001, maximum=86_400)
    except ValueError as exc:
        assert "lease_seconds" in str(exc)
    else:
        assert math.isfinite(got) and 0.001 <= got <= 86_400


@given(st.text(max_size=600))
@example("\ud800")
@example("a\x00")
@example("é" * 600)
def test_property_text_param(text: str) -> None:
    try:
        got = text_param(text, "dedupe_key", max_bytes=MAX_DEDUPE_KEY_BYTES)
    except ValueError as exc:
        assert "dedupe_key" in str(exc)
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            return
        assert not text or "\x00" in text or size > MAX_DEDUPE_KEY_BYTES
    else:
        assert got == text and "\x00" not in text
        assert len(text.encode()) <= MAX_DEDUPE_KEY_BYTES  # encodable: no lone surrogate


def test_naive_datetime_and_wrong_types() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        run_at_params(datetime(2030, 1, 1))
    for bad in (True, "5", b"5", [5]):
        with pytest.raises(TypeError, match="run_at"):
            run_at_params(bad)  # type: ignore[arg-type]

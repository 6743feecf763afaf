"""Retry timing, pure: Retry-After parsing and full-jitter backoff, with Hypothesis."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_core.http import ServiceClient, parse_retry_after
from worker_core.ingest.http_embedder import embeddings_url
from worker_core.retry import backoff

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("99999999999999999999", 300.0),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),  # in the past
        ("Sun, 02 Mar 2025 12:00:00 GMT", 300.0),  # clamped
        ("Sat, 01 Mar 2025 12:00:10 -0000", 10.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("+5", None),
        ("1e3", None),
        ("12abc", None),
        ("\uff11\uff12", None),  # fullwidth digits
        ("Sat, 99 Mar 2025 12:00:30 GMT", None),
    ],
)
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW, max_delay=300.0) == expected


@settings(max_examples=300)
@given(text=st.text(max_size=80), max_delay=st.floats(0, 3600))
def test_any_header_text_is_absent_or_within_the_clamp(text: str, max_delay: float) -> None:
    result = parse_retry_after(text, now=NOW, max_delay=max_delay)
    assert result is None or 0.0 <= result <= max_delay


@settings(max_examples=300)
@given(seconds=st.integers(0, 10**30), max_delay=st.floats(0, 3600))
def test_delay_seconds_are_clamped(seconds: int, max_delay: float) -> None:
    assert parse_retry_after(str(seconds), max_delay=max_delay) == min(float(seconds), max_delay)


@settings(max_examples=300)
@given(offset=st.integers(-(10**7), 10**7), max_delay=st.floats(0, 3600))
def test_http_dates_are_within_the_clamp(offset: int, max_delay: float) -> None:
    header = format_datetime(NOW + timedelta(seconds=offset), usegmt=True)
    result = parse_retry_after(header, now=NOW, max_delay=max_delay)
    assert result is not None
    assert result == pytest.approx(min(max(offset, 0), max_delay))


@settings(max_examples=500)
@given(
    attempt=st.integers(-5, 10_000),
    base=st.floats(1e-6, 1e3),
    spread=st.floats(1, 1e6),
    seed=st.integers(0, 2**32 - 1),
)
def test_backoff_is_within_full_jitter_bounds(
    attempt: int, base: float, spread: float, seed: int
) -> None:
    max_delay = base * spread
    delay = backoff(attempt, base_delay=base, max_delay=max_delay, rng=random.Random(seed))
    exponent = min(max(attempt, 1) - 1, 1100)
    ceiling = min(max_delay, base * 2.0**exponent) if exponent < 1024 else max_delay
    assert 0.0 <= delay <= ceiling


def test_backoff_extremes_use_the_whole_range() -> None:
    class Top:
        def uniform(self, a: float, b: float) -> float:
            return b

    assert backoff(1, base_delay=2, max_delay=300, rng=Top()) == 2
    assert backoff(4, base_delay=2, max_delay=300, rng=Top()) == 16
    assert backoff(50, base_delay=2, max_delay=300, rng=Top()) == 300


def test_service_client_never_shows_secrets() -> None:
    client = ServiceClient(
        "emb",
        "https://user:pa55word@api.example/v1?api_key=k-123456",
        headers={"Authorization": "Bearer sk-secret-value", "X-Api-Key": "k-abcdef"},
    )
    text = repr(client) + client._scrub("echo: sk-secret-value and k-abcdef")
    for secret in ("pa55word", "k-123456", "sk-secret-value", "k-abcdef"):
        assert secret not in text
    with pytest.raises(ValueError, match="base_url"):
        ServiceClient("emb", "ftp://x")


@pytest.mark.parametrize(
    "endpoint",
    ["https://api.x", "https://api.x/", "https://api.x/v1", "https://api.x/v1/embeddings"],
)
def test_embeddings_url(endpoint: str) -> None:
    assert embeddings_url(endpoint) == "https://api.x/v1/embeddings"

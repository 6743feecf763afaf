"""When tracing is on: the API alone is off; a tracer provider turns it on for good.

Each case runs in a fresh interpreter: a tracer provider is process-wide and can be
set only once, and the rest of the suite runs with tracing off.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_api_without_sdk_is_off_and_a_provider_turns_it_on() -> None:
    run(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from worker_core import _tracing

        assert _tracing.api_installed() and not _tracing.enabled()
        with _tracing.producer(None, [{}], {}) as span:  # off: no span, no state
            assert span.state is None and span.span is None
        trace.set_tracer_provider(TracerProvider())
        _tracing._next_check = 0.0  # the next check would come within a second
        assert _tracing.enabled()
        trace.set_tracer_provider(trace.NoOpTracerProvider())  # refused by the API
        assert _tracing.enabled()
        """
    )


def test_without_the_api_tracing_is_off() -> None:
    run(
        """
        import sys
        sys.modules["opentelemetry"] = None
        from worker_core import _tracing, Queue

        assert not _tracing.api_installed() and not _tracing.enabled()
        """
    )


def test_enqueue_span_fills_correlation_ids_and_stores_the_context() -> None:
    run(
        """
        import json
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from worker_core import WorkerConfig, _tracing
        from worker_core._statements import Statements

        trace.set_tracer_provider(TracerProvider())
        statements = Statements(WorkerConfig())
        kwargs = {"queue": "docs", "correlation_ids": [None, "mine"]}
        with _tracing.producer(statements, [{}, {}], kwargs) as span:
            state = json.loads(span.state)
            span.sent([1, 2])
        assert kwargs["correlation_ids"][1] == "mine" and len(kwargs["correlation_ids"][0]) == 36
        assert state[_tracing.TRACE_KEY]["traceparent"].startswith("00-")
        """
    )

"""OpenTelemetry spans from the producer to every stage (the ``otel`` extra).

Only the OpenTelemetry API is used; the application chooses the SDK and exporters.
An enqueue opens a PRODUCER span and stores its W3C trace context in the new jobs'
initial state, under ``TRACE_KEY``; the worker opens a CONSUMER span per job that
continues it, and a child span per stage. Spans follow the messaging semantic
conventions and carry the job's correlation id.

Off (the API missing, or no tracer provider configured) a job costs one call of
``enabled()``: a global read and an ``isinstance``. The trace context lives in the
job's state rather than in a column of its own, so tracing needs no migration;
stages see the key in ``ctx.state`` and should leave it alone.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .redact import redact_text

if TYPE_CHECKING:
    from ._statements import Statements
    from .jobs import Job

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _API = True
except ImportError:  # the otel extra is not installed
    _trace = None  # type: ignore[assignment]
    _API = False

__all__ = ["TRACE_KEY", "Consumer", "Producer", "api_installed", "consumer", "enabled", "producer"]

#: The key of a job's state that holds the producer's W3C trace context.
TRACE_KEY = "worker_core.trace"
SYSTEM = "worker_core"
_TRACER_NAME = "worker_core"

if _API:
    _OFF_PROVIDERS: tuple[type, ...] = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)
    _PROPAGATOR = TraceContextTextMapPropagator()


def api_installed() -> bool:
    """The OpenTelemetry API could be imported (the ``otel`` extra)."""
    return _API


def enabled() -> bool:
    """True when spans would be recorded: the API is installed and the application
    set a tracer provider (an SDK).

    Asking the API costs microseconds (it looks up an environment variable on every
    call while no provider is set), too much for every job of a fast drain. A
    provider, once set, can never be replaced, so "on" is remembered for good; "off"
    is asked again at most once a second, so a provider set after the worker started
    is picked up within a second.
    """
    global _on, _next_check
    if _on:
        return True
    if not _API:
        return False
    now = time.monotonic()
    if now < _next_check:
        return False
    _on = not isinstance(_trace.get_tracer_provider(), _OFF_PROVIDERS)
    _next_check = now + _RECHECK_SECONDS
    return _on


_on = False
_next_check = 0.0
_RECHECK_SECONDS = 1.0


class Producer:
    """The enqueue span: ``state`` is the JSON the new jobs start with."""

    __slots__ = ("span", "state")

    def __init__(self, span: Any, state: str | None) -> None:
        self.span = span
        self.state = state

    def sent(self, ids: Sequence[int]) -> None:
        if self.span is None:
            return
        if len(ids) == 1:
            self.span.set_attribute("messaging.message.id", str(ids[0]))
        else:
            self.span.set_attribute("messaging.batch.message_count", len(ids))


class _Off:
    """What ``producer()`` returns when tracing is off: no span, no state."""

    __slots__ = ()
    _producer = Producer(None, None)

    def __enter__(self) -> Producer:
        return self._producer

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


_OFF = _Off()


def producer(
    statements: Statements, payloads: Sequence[Mapping[str, Any]], kwargs: dict[str, Any]
) -> AbstractContextManager[Producer]:
    """The enqueue span for one ``enqueue``/``enqueue_many`` call.

    When tracing is on and the caller gave no correlation ids, they are made here
    (not by the database) so the producer span can carry them: ``kwargs`` is
    updated in place.
    """
    if not enabled():
        return _OFF
    return _producer(statements, payloads, kwargs)


@contextmanager
def _producer(
    statements: Statements, payloads: Sequence[Mapping[str, Any]], kwargs: dict[str, Any]
) -> Iterator[Producer]:
    n = len(payloads) if not isinstance(payloads, Mapping) else 1
    try:
        queue = statements.queue_name(kwargs.get("queue"))
    except (TypeError, ValueError):
        queue = str(kwargs.get("queue"))[:200]  # the enqueue itself reports it
    cids = kwargs.get("correlation_ids")
    if cids is None:
        cids = [None] * n
    if isinstance(cids, list | tuple) and len(cids) == n and None in cids:
        cids = [str(uuid.uuid4()) if c is None else c for c in cids]
        kwargs["correlation_ids"] = cids
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "enqueue",
        "messaging.destination.name": queue,
    }
    if kwargs.get("kind") is not None:
        attributes["worker_core.job.kind"] = str(kwargs["kind"])
    if n == 1 and isinstance(cids, Sequence) and len(cids) == 1 and isinstance(cids[0], str):
        attributes["worker_core.correlation_id"] = cids[0]
        attributes["messaging.message.conversation_id"] = cids[0]
    tracer = _trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        f"send {queue}", kind=_trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        state = json.dumps({TRACE_KEY: carrier}) if carrier else None
        yield Producer(span, state)


class Consumer:
    """The job span of one run; ``stage(name)`` opens a child span per stage.

    Exceptions are recorded by hand, not by the SDK: the message goes through the
    same redaction as logs and error records, and no traceback is attached (its
    frames' text could hold what the message had masked).
    """

    __slots__ = ("_attributes", "_secrets", "_tracer", "span")

    def __init__(
        self, tracer: Any, span: Any, attributes: dict[str, Any], secrets: Sequence[str]
    ) -> None:
        self._tracer = tracer
        self.span = span
        self._attributes = attributes
        self._secrets = secrets

    @contextmanager
    def stage(self, name: str) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
            f"stage {name}",
            kind=_trace.SpanKind.INTERNAL,
            attributes={**self._attributes, "worker_core.stage": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                _record(span, exc, self._secrets)
                raise

    def failed(self, exc: BaseException) -> None:
        _record(self.span, exc, self._secrets)


def _record(span: Any, exc: BaseException, secrets: Sequence[str]) -> None:
    kind = type(exc)
    message = redact_text(str(exc), secrets)[:2000]
    span.add_event(
        "exception",
        {
            "exception.type": f"{kind.__module__}.{kind.__qualname__}",
            "exception.message": message,
        },
    )
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, kind.__name__))


@contextmanager
def consumer(job: Job, *, worker_id: str, secrets: Sequence[str] = ()) -> Iterator[Consumer]:
    """The CONSUMER span of one run of ``job``, continuing the producer's trace when
    the job carries its context. Call only when ``enabled()``."""
    carrier = job.state.get(TRACE_KEY) if isinstance(job.state, dict) else None
    parent = _PROPAGATOR.extract(carrier) if isinstance(carrier, dict) else None
    common: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": job.queue,
        "messaging.message.id": str(job.id),
        "messaging.message.conversation_id": job.correlation_id,
        "worker_core.correlation_id": job.correlation_id,
        "worker_core.job.attempt": job.attempt,
    }
    kind = getattr(job, "kind", None)
    if kind is not None:
        common["worker_core.job.kind"] = str(kind)
    tracer = _trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        f"process {job.queue}",
        context=parent,
        kind=_trace.SpanKind.CONSUMER,
        attributes={
            **common,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": job.queue,
            "worker_core.worker_id": worker_id,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield Consumer(tracer, span, common, secrets)

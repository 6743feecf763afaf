"""Structured logging: StructuredLogger, configure_logging, job context and redaction.

The library never configures logging by itself: importing worker_core only adds a
``NullHandler`` to the ``worker_core`` logger and never touches structlog's global
configuration. Records travel through the standard library, so an application's
own handlers receive them; their message reads ``event key=value ...`` (secrets
masked) and a structlog ``ProcessorFormatter`` of the application sees the fields
as structured data. ``configure_logging`` (opt-in; the command line calls it)
installs one handler on the root logger that renders every record, ours and those
of psycopg, botocore or the application, as JSON lines (or a readable console
format) that start with ``timestamp``, ``level``, ``logger`` and ``event``, carry
the job context, and have secrets masked, tracebacks included.

Job context lives in structlog's contextvars (``job_context`` binds it), so an
application that uses ``structlog.contextvars`` shares it, and concurrent asyncio
tasks never see each other's ids.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, MutableMapping
from types import MappingProxyType
from typing import Any, Literal, Protocol

from structlog.contextvars import get_contextvars

from .redact import Redactor, redact_text

__all__ = ["StructuredLogger", "configure_logging", "job_context", "unconfigure_logging"]

logging.getLogger("worker_core").addHandler(logging.NullHandler())

_HANDLER_MARK = "_worker_core_handler"
#: Keys of the event dict that are not fields of the line.
_META = frozenset({"event", "exc_info", "stack_info"})
#: Every line starts with these, in this order.
_HEAD = ("timestamp", "level", "logger", "event")
#: Attributes every LogRecord has; anything else on a foreign record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class TextStream(Protocol):
    """Where lines go: anything with ``write(str)`` and ``flush()``."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


#: The redactor of the active configuration (also used when a record is created).
_active = Redactor()


class _Event(dict[str, Any]):
    """An event dict that reads well (and masked) when a plain stdlib formatter prints it."""

    def __str__(self) -> str:
        fields = " ".join(f"{k}={v!r}" for k, v in self.items() if k not in _META)
        return redact_text(f"{self.get('event', '')} {fields}".rstrip(), _active.secrets)

    __repr__ = __str__


def _exc_tuple(exc_info: Any) -> Any:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return None
    return exc_info


def _format_exc(exc_info: Any) -> str:
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


class StructuredLogger:
    """A logger with bound context: ``StructuredLogger("app", service="ingest").info("done", n=3)``.

    Lines written while a job runs also carry the job's context (``correlation_id``,
    ``job_id``, ``queue``, ``stage``, ``attempt``, ``worker_id``). A call whose level
    is off costs one dictionary lookup.
    """

    __slots__ = ("_context", "_logger", "name")

    def __init__(self, name: str = "worker_core", **context: Any) -> None:
        self.name = name
        self._logger = logging.getLogger(name)
        self._context: dict[str, Any] = context

    def bind(self, **context: Any) -> StructuredLogger:
        """A new logger with ``context`` added."""
        new = object.__new__(StructuredLogger)
        new.name = self.name
        new._logger = self._logger
        new._context = {**self._context, **context}
        return new

    @property
    def context(self) -> dict[str, Any]:
        return dict(self._context)

    def is_enabled_for(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def debug(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, "error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.CRITICAL):
            self._emit(logging.CRITICAL, "critical", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at ERROR with the current exception's traceback (masked)."""
        if self._logger.isEnabledFor(logging.ERROR):
            fields.setdefault("exc_info", True)
            self._emit(logging.ERROR, "error", event, fields)

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        # Context order: job context, then bound context, then this call's fields.
        data = _Event(current_context())
        data.update(self._context)
        data.update(fields)
        data["event"] = event
        exc_info = _exc_tuple(data["exc_info"]) if "exc_info" in data else None
        if exc_info is not None:
            data["exc_info"] = exc_info
        else:
            data.pop("exc_info", None)
        # The caller's frame, found directly instead of by the stdlib's stack walk.
        caller = sys._getframe(2)
        code = caller.f_code
        logger = self._logger
        record = logger.makeRecord(
            logger.name, level, code.co_filename, caller.f_lineno, data, (), exc_info, code.co_name
        )
        # What a structlog ProcessorFormatter of the application looks for.
        record.__dict__["_logger"] = logger
        record.__dict__["_name"] = method
        if exc_info is not None:
            # Pre-rendered and masked: every stdlib Formatter prints exc_text as it is.
            record.exc_text = redact_text(_format_exc(exc_info), _active.secrets)
        logger.handle(record)

    def __repr__(self) -> str:
        return f"StructuredLogger({self.name!r})"


#: The running job's context. One variable holding one dict: binding a job costs a
#: single set and reset (structlog's per-key variables cost several times that, per
#: job and per stage, on the worker's hot path).
_JOB_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "worker_core_job_context", default=MappingProxyType({})
)


class job_context:  # lower case: used like the function it was, with job_context(...)
    """Bind ``fields`` to every line logged in this task (and tasks it starts).

    A class rather than a ``contextlib.contextmanager`` generator: it is entered
    for every job and every stage, and a generator-based manager costs several
    times as much to create, enter and leave."""

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._token: contextvars.Token[Mapping[str, Any]] | None = None

    def __enter__(self) -> None:
        self._token = _JOB_CONTEXT.set({**_JOB_CONTEXT.get(), **self._fields})

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _JOB_CONTEXT.reset(self._token)
            self._token = None


def current_context() -> dict[str, Any]:
    """The context lines get now: the application's structlog contextvars, then the job's."""
    context = get_contextvars()
    context.update(_JOB_CONTEXT.get())
    return context


class _Formatter(logging.Formatter):
    """Renders any record as one ordered, masked event dict: JSON or console text."""

    def __init__(self, fmt: Literal["json", "console"], redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor
        self._second: tuple[int, str] = (-1, "")
        self._render: Any
        if fmt == "json":
            self._render = _json_renderer()
        else:
            from structlog.dev import ConsoleRenderer

            console = ConsoleRenderer(colors=False)
            self._render = lambda data: console(None, data["level"], data)

    def _timestamp(self, created: float) -> str:
        second = int(created)
        cached = self._second
        if cached[0] != second:  # strftime once per second, not once per line
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        return f"{cached[1]}.{int((created - second) * 1_000_000):06d}Z"

    def event_dict(self, record: logging.LogRecord) -> dict[str, Any]:
        """The line's fields in order, masked and JSON-native."""
        redactor = self._redactor
        msg = record.msg
        out: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": "",
        }
        if isinstance(msg, dict):  # ours, or structlog's wrap_for_formatter
            items: Iterable[tuple[str, Any]] = msg.items()
            event = msg.get("event", "")
        else:
            event = record.getMessage()
            extra = [
                (k, v)
                for k, v in record.__dict__.items()
                if k not in _RECORD_ATTRS and not k.startswith("_")
            ]
            items = [*current_context().items(), *extra]
        out["event"] = redactor.text(event if isinstance(event, str) else str(event))
        for key, value in items:
            if key in _META:
                continue
            name = key if isinstance(key, str) else str(key)
            if name in out:
                if name in _HEAD:  # a field called "level" must not replace the header
                    out[f"{name}_"] = redactor.field(name, value)
                continue
            out[name] = redactor.field(name, value)
        if record.exc_info or record.exc_text:
            text = record.exc_text or _format_exc(record.exc_info)
            out["exception"] = redactor.text(text)
        if record.stack_info:
            out["stack"] = redactor.text(record.stack_info)
        return out

    def format(self, record: logging.LogRecord) -> str:
        rendered: str = self._render(self.event_dict(record))
        return rendered


def _json_renderer() -> Any:
    try:
        import orjson
    except ImportError:
        return lambda data: json.dumps(data, default=str, ensure_ascii=False)

    dumps, option = orjson.dumps, orjson.OPT_NON_STR_KEYS

    def render(data: dict[str, Any]) -> str:
        try:
            return dumps(data, default=str, option=option).decode()
        except TypeError:  # integers beyond 64 bits, among others
            return json.dumps(data, default=str, ensure_ascii=False)

    return render


def configure_logging(
    level: str | int = "INFO",
    fmt: Literal["json", "console"] = "json",
    stream: TextStream | None = None,
    redact_keys: Iterable[str] = (),
    *,
    secrets: Iterable[str] = (),
) -> logging.Handler:
    """Render every log record of the process as JSON lines (or console text).

    Installs one handler on the root logger (replacing one this function installed
    before, never the application's own) and returns it. Lines start with
    ``timestamp`` (ISO 8601 UTC), ``level``, ``logger`` and ``event``, then the job
    and bound context and the call's fields; a traceback goes under ``exception``.

    Args:
        level: the root level.
        fmt: ``json`` (one object per line) or ``console``.
        stream: where lines go (default ``sys.stderr``).
        redact_keys: extra key names whose values are masked.
        secrets: literal secret values to mask wherever they appear.
    """
    global _active
    if fmt not in ("json", "console"):
        raise ValueError(f"fmt must be 'json' or 'console', not {fmt!r}")
    redactor = Redactor(redact_keys, secrets)
    handler: logging.StreamHandler[Any] = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt, redactor))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    unconfigure_logging()
    _active = redactor
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    return handler


def unconfigure_logging() -> None:
    """Remove the handler ``configure_logging`` installed (the application's stay)."""
    global _active
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
            existing.close()
    _active = Redactor()


def is_configured() -> bool:
    """True when ``configure_logging`` installed its handler."""
    return any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger().handlers)


def safe_fields(fields: Mapping[str, Any]) -> MutableMapping[str, Any]:
    """``fields`` with secrets masked and made JSON-native, for text that leaves the
    process (errors, health)."""
    masked: MutableMapping[str, Any] = _active.value(dict(fields))
    return masked

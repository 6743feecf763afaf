"""Structured logging: StructuredLogger, configure_logging, job context and redaction.

The library never configures logging by itself: importing worker_core only adds a
``NullHandler`` to the ``worker_core`` logger. Records travel through the
standard library, so an application's own handlers receive them; their message
reads ``event key=value ...``. ``configure_logging`` (opt-in; the command line
calls it) installs one handler on the root logger that renders every record,
ours and those of psycopg, botocore or the application, as JSON lines (or a
readable console format) with the job context and with secrets masked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import IO, Any, Literal

import structlog
from structlog.contextvars import bound_contextvars, merge_contextvars
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, WrappedLogger

from .redact import redact_text, redact_value

__all__ = ["StructuredLogger", "configure_logging", "job_context", "unconfigure_logging"]

logging.getLogger("worker_core").addHandler(logging.NullHandler())

_HANDLER_MARK = "_worker_core_handler"


class _Event(dict[str, Any]):
    """An event dict that reads well when a plain stdlib formatter prints it."""

    def __str__(self) -> str:
        fields = " ".join(
            f"{k}={v!r}" for k, v in self.items() if k not in ("event", "exc_info", "stack_info")
        )
        text = f"{self.get('event', '')} {fields}".rstrip()
        return redact_text(text)

    __repr__ = __str__


def _capture_exc_info(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    # Resolve exc_info while the exception is current, not later in a handler.
    if event_dict.get("exc_info") is True:
        event_dict["exc_info"] = sys.exc_info()
    return event_dict


def _to_stdlib(
    logger: WrappedLogger, name: str, event_dict: EventDict
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    exc_info = event_dict.get("exc_info")
    # Same record shape as structlog's wrap_for_formatter, so ProcessorFormatter
    # renders it as structured data; the message itself is a readable _Event.
    return (_Event(event_dict),), {
        "extra": {"_logger": logger, "_name": name},
        "exc_info": exc_info or None,
        "stacklevel": 5,
    }


_EMIT_CHAIN: list[Any] = [
    structlog.stdlib.filter_by_level,
    merge_contextvars,
    _capture_exc_info,
    _to_stdlib,
]


class StructuredLogger:
    """A logger with bound context: ``StructuredLogger("app", service="ingest").info("done", n=3)``.

    Lines written while a job runs also carry the job's context (``correlation_id``,
    ``job_id``, ``queue``, ``stage``, ``attempt``, ``worker_id``).
    """

    __slots__ = ("_log", "name")

    def __init__(self, name: str = "worker_core", **context: Any) -> None:
        self.name = name
        self._log: Any = structlog.wrap_logger(
            logging.getLogger(name),
            processors=_EMIT_CHAIN,
            wrapper_class=structlog.stdlib.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        ).bind(**context)

    def bind(self, **context: Any) -> StructuredLogger:
        """A new logger with ``context`` added."""
        new = object.__new__(StructuredLogger)
        new.name = self.name
        new._log = self._log.bind(**context)
        return new

    @property
    def context(self) -> dict[str, Any]:
        return dict(self._log._context)

    def is_enabled_for(self, level: int) -> bool:
        return logging.getLogger(self.name).isEnabledFor(level)

    def debug(self, event: str, **fields: Any) -> None:
        self._log.debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log.warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log.error(event, **fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._log.critical(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at ERROR with the current exception's traceback (redacted when rendered)."""
        fields.setdefault("exc_info", True)
        self._log.error(event, **fields)

    def __repr__(self) -> str:
        return f"StructuredLogger({self.name!r})"


@contextlib.contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Bind ``fields`` to every line logged in this task (and tasks it starts)."""
    with bound_contextvars(**fields):
        yield


class _Redactor:
    """The last processor before rendering: masks sensitive keys and secret text."""

    def __init__(self, keys: Iterable[str], secrets: Iterable[str]) -> None:
        self.keys = tuple(keys)
        self.secrets = tuple(s for s in secrets if s)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        redacted: EventDict = redact_value(event_dict, self.keys, self.secrets)
        return redacted


def _json_serializer() -> Any:
    try:
        import orjson
    except ImportError:
        return lambda obj, **kw: json.dumps(obj, default=str, ensure_ascii=False)

    def dumps(obj: Any, **kw: Any) -> str:
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()

    return dumps


def _drop_internal(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("_record", None)
    event_dict.pop("_from_structlog", None)
    if not isinstance(event_dict.get("event"), str):
        event_dict["event"] = str(event_dict.get("event"))
    return event_dict


def configure_logging(
    level: str | int = "INFO",
    fmt: Literal["json", "console"] = "json",
    stream: IO[str] | None = None,
    redact_keys: Iterable[str] = (),
    *,
    secrets: Iterable[str] = (),
) -> logging.Handler:
    """Render every log record of the process as JSON lines (or console text).

    Installs one handler on the root logger (replacing one this function
    installed before, never the application's own) and returns it.

    Args:
        level: the root level.
        fmt: ``json`` (one object per line) or ``console``.
        stream: where lines go (default ``sys.stderr``).
        redact_keys: extra key names whose values are masked.
        secrets: literal secret values to mask wherever they appear.
    """
    foreign_chain: list[Any] = [
        merge_contextvars,
        structlog.stdlib.ExtraAdder(),
    ]
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
    common: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,  # reads the record, so before remove_processors_meta
        timestamper,
        ProcessorFormatter.remove_processors_meta,
        _drop_internal,
        structlog.processors.format_exc_info,
        _Redactor(redact_keys, secrets),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_serializer())
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        raise ValueError(f"fmt must be 'json' or 'console', not {fmt!r}")
    formatter = ProcessorFormatter(
        foreign_pre_chain=foreign_chain,
        processors=[*common, renderer],
        keep_exc_info=False,
        keep_stack_info=False,
        pass_foreign_args=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    unconfigure_logging()
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    return handler


def unconfigure_logging() -> None:
    """Remove the handler ``configure_logging`` installed (the application's stay)."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
            existing.close()


def is_configured() -> bool:
    """True when ``configure_logging`` installed its handler."""
    return any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger().handlers)


def safe_fields(fields: Mapping[str, Any]) -> MutableMapping[str, Any]:
    """``fields`` with secrets masked, for text that leaves the process (errors, health)."""
    masked: MutableMapping[str, Any] = redact_value(dict(fields))
    return masked

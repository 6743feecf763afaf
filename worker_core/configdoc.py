"""The configuration reference (docs/configuration.md), generated from WorkerConfig.

``python -m worker_core.configdoc > docs/configuration.md`` rewrites it; a test
checks the committed file is current, so the reference cannot drift.
"""

from __future__ import annotations

import enum
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import WorkerConfig

__all__ = ["render"]

_HEADER = """# Configuration reference

Generated from `worker_core.config.WorkerConfig` by `python -m worker_core.configdoc`;
do not edit by hand.

Every field can be given as a keyword argument (`WorkerConfig(queue={"concurrency": 20})`)
or through the environment: prefix `WORKER_CORE_`, sections joined with `__`
(`WORKER_CORE_QUEUE__CONCURRENCY=20`). Keyword arguments win over the environment.
Invalid values raise `pydantic.ValidationError` naming the field; values are never
echoed in the error, so a mistyped DSN cannot leak its password. Every float is
finite (`inf` and `NaN` are refused, from code and from the environment) and every
duration and size has an upper bound (the `<=` in its rule).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (dict, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    if info.default is PydanticUndefined:
        return "required"
    value = info.default
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    return f"`{value!r}`"


def _rule(info: FieldInfo) -> str:
    parts = [info.description or ""]
    for meta in info.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, name, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
        for name in ("min_length", "max_length"):
            bound = getattr(meta, name, None)
            if bound is not None:
                parts.append(f"{name.replace('_', ' ')} {bound}")
    return "; ".join(p for p in parts if p)


def render() -> str:
    lines = [_HEADER]
    top = [(n, f) for n, f in WorkerConfig.model_fields.items()]
    for name, info in top:
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"\n## `{name}`\n")
            if annotation.__doc__:
                lines.append(annotation.__doc__.strip().splitlines()[0] + "\n")
            lines.append("| field | type | default | env | rule |")
            lines.append("|---|---|---|---|---|")
            for field, sub in annotation.model_fields.items():
                env = f"`WORKER_CORE_{name.upper()}__{field.upper()}`"
                lines.append(
                    f"| `{name}.{field}` | {_type_name(sub.annotation)} | {_default(sub)} | "
                    f"{env} | {_rule(sub)} |"
                )
        else:
            lines.append(f"\n## `{name}`\n")
            lines.append("| type | default | env | rule |")
            lines.append("|---|---|---|---|")
            lines.append(
                f"| {_type_name(annotation)} | {_default(info)} | "
                f"`WORKER_CORE_{name.upper()}` | {_rule(info)} |"
            )
    lines.append(
        "\n## Rules across fields\n\n"
        "- `database.schema` is a full match of `[a-z_][a-z0-9_]*` (at most 63 characters) "
        "and does not start with `pg_`\n"
        "- `database.pool_min_size <= database.pool_max_size`\n"
        "- `queue.heartbeat_seconds < queue.lease_seconds`\n"
        "- `retry.base_delay <= retry.max_delay`\n"
        "- `storage.bucket` is required when `storage.backend` is `s3`\n"
        "- `embedding.endpoint` is required when `embedding.provider` is `http`\n"
        "- `environment=production` refuses: no `database.dsn`, `logging.format=console`, "
        "and plain-http endpoints (other than loopback) that carry credentials\n"
        "- secrets (`database.dsn`'s password, `storage.access_key_id`, "
        "`storage.secret_access_key`, `embedding.api_key`) never appear in `repr`, `str`, "
        "errors or logs\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")

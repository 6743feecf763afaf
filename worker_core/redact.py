"""Masking of secrets in text and structured values.

Used by the log processors, by the error records stored on jobs, and by the
``repr`` of configuration. The rules are deliberately broad: a false positive
costs a ``***`` in a log line, a false negative costs a leaked credential.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MASK", "SENSITIVE_KEYS", "is_sensitive_key", "mask_dsn", "redact_text", "redact_value"]

MASK = "***"

#: Substrings of a key (case-insensitive, ``-`` read as ``_``) whose value is a secret.
SENSITIVE_KEYS: frozenset[str] = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "access_key",
        "private_key",
        "credential",
        "cookie",
        "session_key",
        "x_api_key",
    }
)

# scheme://user:PASSWORD@host — the password ends at the last "@" before the host part.
_URL_PASSWORD = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/?#@\s]*:)(?P<pw>[^@\s/]+)@")
# password=... / secret: ... pairs in free text, key=value DSNs and query strings.
_KV_SECRET = re.compile(
    r"(?P<key>\b[\w\-]*(?:password|passwd|pwd|secret|token|api[_\-]?key|access[_\-]?key)[\w\-]*"
    r"[\"']?\s*[=:]\s*)(?:(?P<q>[\"'])(?:\\.|(?!(?P=q)).)*(?P=q)|(?P<val>[^\s\"'&,;)}\]]+))",
    re.IGNORECASE,
)
# Every key _KV_SECRET can match contains one of these.
_KV_HINT = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)
# Authorization header values.
_AUTH_SCHEME = re.compile(
    r"\b(?P<scheme>Bearer|Basic|Token|Digest)\s+(?P<val>[A-Za-z0-9._~+/=\-]{4,})"
)


def is_sensitive_key(key: str, extra: Iterable[str] = ()) -> bool:
    """True when ``key`` names a secret (by substring, case-insensitively)."""
    k = key.lower().replace("-", "_")
    return any(s in k for s in SENSITIVE_KEYS) or any(s.lower() in k for s in extra)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask URL passwords, ``key=value`` secrets, auth headers and known secret values."""
    if not text:
        return text
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m['pre']}{MASK}@", text)
    if _KV_HINT.search(text):  # the pair regex backtracks a lot; skip it when it cannot match
        text = _KV_SECRET.sub(_mask_pair, text)
    return _AUTH_SCHEME.sub(lambda m: f"{m['scheme']} {MASK}", text)


def _mask_pair(m: re.Match[str]) -> str:
    quote = m["q"] or ""
    return f"{m['key']}{quote}{MASK}{quote}"


def redact_value(value: Any, extra_keys: Iterable[str] = (), secrets: Iterable[str] = ()) -> Any:
    """Return a copy of ``value`` with sensitive keys and secret-looking text masked."""
    extra = tuple(extra_keys)
    known = tuple(secrets)
    return _redact(value, extra, known, 0)


def _redact(value: Any, extra: tuple[str, ...], known: tuple[str, ...], depth: int) -> Any:
    if depth > 32:
        return value
    if isinstance(value, str):
        return redact_text(value, known)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            # Counts and flags under secret-sounding keys (token_count) are not secrets.
            if (
                isinstance(k, str)
                and is_sensitive_key(k, extra)
                and v not in (None, "")
                and not isinstance(v, bool | int | float)
            ):
                out[k] = MASK
            else:
                out[k] = _redact(v, extra, known, depth + 1)
        return out
    if isinstance(value, list | tuple):
        items = [_redact(v, extra, known, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def mask_dsn(dsn: str) -> str:
    """A DSN with its password replaced by ``***`` (URL and key=value forms)."""
    return redact_text(dsn)

"""Masking of secrets in text and structured values: the one redactor of worker_core.

Log lines, the error records stored on jobs, health reports, command-line errors
and the ``repr`` of configuration all go through ``Redactor`` (or the functions
below, which use the same rules). The rules are deliberately broad: a false
positive costs a ``***`` in a log line, a false negative costs a leaked credential.

Text rules, in order:

- literal secret values the caller knows (``config.secrets()``);
- the password of a URL (``scheme://user:PASSWORD@host``), up to the last ``@``
  before the path, so a raw ``@`` in a password does not leave a tail behind;
- ``password=`` (and ``secret``, ``token``, ``api_key``, ...) parameters of a URL
  query string, up to the next ``&``;
- ``key=value`` / ``key: value`` pairs whose key names a secret, in every libpq
  form: unquoted with backslash escapes (``password=Se\\ cretPw``: the value runs
  to the first unescaped blank), single- or double-quoted with escapes
  (``password='a \\'b'``), blanks around ``=``;
- ``Authorization`` header values (``Bearer``, ``Basic``, ...).
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MASK",
    "SENSITIVE_KEYS",
    "Redactor",
    "is_sensitive_key",
    "mask_dsn",
    "redact_text",
    "redact_value",
]

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

#: Nesting below which a structure is cut (``"..."``), never returned unmasked.
MAX_DEPTH = 32

_SECRET_WORD = r"(?:password|passwd|pwd|secret|token|api[_\-]?key|access[_\-]?key)"
# scheme://user:PASSWORD@host: the password runs to the last "@" before a blank
# or the end (a raw "@" or "/" in a password is invalid, but must not leak either).
_URL_PASSWORD = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/?#@\s]*:)(?P<pw>\S+)@")
# ?password=...&next=... in a URL's query string: percent-encoded, so "&" ends it.
_QUERY_SECRET = re.compile(rf"(?P<key>[?&][\w\-]*{_SECRET_WORD}[\w\-]*=)(?P<val>[^&#\s]*)", re.I)
# key=value pairs in free text and libpq DSNs. The value is quoted (with backslash
# escapes inside; a closing quote followed by more of a word, as in ""0, is no
# quote: the value is then unquoted) or runs to the first unescaped blank, as libpq
# reads it. A run of
# backslashes escapes the next character: repr() doubles each backslash, and a
# repr'd DSN (in a traceback) must not leave the tail after "Se\\ " behind.
_KV_SECRET = re.compile(
    rf"(?<![?&\w\-])(?P<key>\b[\w\-]*{_SECRET_WORD}[\w\-]*[\"']?\s*[=:]\s*)"
    r"(?:(?P<e>\\*)(?P<q>[\"'])(?:\\+.|(?!(?P=q))[^\\])*(?:(?P=q)(?=[\s,;:)}\]&'\"\\]|$)|$)"
    r"|(?P<val>(?:\\+.|[^\s\\])+\\*))",
    re.IGNORECASE | re.DOTALL,
)
# Every key the pair rules can match contains one of these.
_KV_HINT = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)
# Authorization header values.
_AUTH_SCHEME = re.compile(
    r"\b(?P<scheme>Bearer|Basic|Token|Digest)\s+(?P<val>[A-Za-z0-9._~+/=\-]{4,})"
)

# Per-redactor caches: log lines repeat the same keys and short values (event names,
# ids, queue names) endlessly, and the regexes are the bulk of the cost of a line.
_CACHE_MAX = 4096
_CACHED_TEXT_MAX = 256


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
    if _KV_HINT.search(text):  # the pair regexes backtrack a lot; skip them when they cannot match
        if "=" in text:
            text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
        text = _KV_SECRET.sub(_mask_pair, text)
    return _AUTH_SCHEME.sub(lambda m: f"{m['scheme']} {MASK}", text)


def _mask_pair(m: re.Match[str]) -> str:
    key = m["key"]
    if m.start() and m.string[m.start() - 1] in "/@" and "=" not in key:
        # "scheme://pwd:..." or "...@pwd:5432": a URL's user or host and its ":", not a
        # pair (the URL's password, if any, was masked by the URL rule already).
        return m[0]
    if not m["q"]:
        return f"{key}{MASK}"
    # The opening quote, with the backslashes repr() put before it ("password=\\'x\\'").
    opening = (m["e"] or "") + m["q"]
    if m[0].endswith(m["q"]) and len(m[0]) > len(key) + len(opening):
        return f"{key}{opening}{MASK}{opening}"
    # An unclosed quote, masked to the end of the text: the quote (and backslashes
    # before it) may be the value's own first characters (libpq quotes with ' only,
    # and an unquoted value may start with " or \\), so they go too.
    return f"{key}{MASK}"


def mask_dsn(dsn: str) -> str:
    """A DSN with its password replaced by ``***`` (URL and key=value forms)."""
    return redact_text(dsn)


class Redactor:
    """Masks sensitive keys (recursively) and secret text; returns JSON-native values.

    Args:
        keys: extra key names (substrings) whose values are secrets.
        secrets: literal secret values to mask wherever they appear.
    """

    __slots__ = ("_extra", "_keys", "_texts", "secrets")

    def __init__(self, keys: Iterable[str] = (), secrets: Iterable[str] = ()) -> None:
        self._extra = tuple(k.lower() for k in keys if k)
        self.secrets = tuple(s for s in secrets if s)
        self._keys: dict[str, bool] = {}
        self._texts: dict[str, str] = {}

    def sensitive(self, key: str) -> bool:
        hit = self._keys.get(key)
        if hit is None:
            hit = is_sensitive_key(key, self._extra)
            if len(self._keys) >= _CACHE_MAX:
                self._keys.clear()
            self._keys[key] = hit
        return hit

    def text(self, text: str) -> str:
        if len(text) > _CACHED_TEXT_MAX:
            return redact_text(text, self.secrets)
        done = self._texts.get(text)
        if done is None:
            done = redact_text(text, self.secrets)
            if len(self._texts) >= _CACHE_MAX:
                self._texts.clear()
            self._texts[text] = done
        return done

    def field(self, key: str, value: Any, depth: int = 0) -> Any:
        """``value`` cleaned, or the mask when ``key`` names a secret."""
        kind = type(value)
        if value is None or kind is int or kind is float or kind is bool:
            return value  # token_count is no secret
        if self.sensitive(key) and value != "" and not isinstance(value, int | float):
            return MASK
        return self.value(value, depth)

    def value(self, value: Any, depth: int = 0) -> Any:
        """``value`` as JSON-native data with every secret masked."""
        kind = type(value)
        if kind is str:
            return self.text(value)
        if value is None or kind is int or kind is float or kind is bool:
            return value
        if depth >= MAX_DEPTH:
            return "..."  # cut, never returned as it is
        if isinstance(value, Mapping):
            return {str(k): self.field(str(k), v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v, depth + 1) for v in value]
        if isinstance(value, enum.Enum):
            return self.value(value.value, depth + 1)
        if isinstance(value, str):
            return self.text(str.__str__(value))
        if isinstance(value, bool | int | float):
            return value
        if isinstance(value, _dt.datetime | _dt.date | _dt.time):
            return value.isoformat()
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        # Anything else becomes text here, not in a JSON encoder, so its str() is
        # scrubbed too (an object whose str() quotes a DSN).
        try:
            text = str(value)
        except Exception:
            text = object.__repr__(value)
        return self.text(text)


def redact_value(value: Any, extra_keys: Iterable[str] = (), secrets: Iterable[str] = ()) -> Any:
    """``value`` as JSON-native data with sensitive keys and secret-looking text masked."""
    return Redactor(extra_keys, secrets).value(value)

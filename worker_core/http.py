"""ServiceClient: calls to an external HTTP service, mapped onto worker_core's errors.

Each request goes through, in this order: the service's rate limit (waiting holds
no connection), its circuit breaker, and a timeout that runs *inside* the breaker
call, so a hung service counts as a failure instead of being cancelled unseen.
Outcomes map onto the error tree::

    2xx, 3xx                       ServiceResponse (the body is read inside the timeout)
    429, or 503 with Retry-After   RetryableError(retry_after=...)  not a breaker failure
    other 5xx, timeouts,           TransientError                   a breaker failure
      connection errors
    other 4xx                      PermanentError                   not a breaker failure

``Retry-After`` is read as delay-seconds or an HTTP-date and clamped to
``[0, max_retry_after]``; an unreadable value counts as absent. The job's
correlation id travels as ``X-Correlation-ID``. Secrets stay out of every message,
``repr`` and log line: values of sensitive headers (``Authorization``, API keys)
are scrubbed from error text, query strings are never quoted, and the base URL is
shown with any password masked.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict

from .errors import PermanentError, RetryableError, TransientError
from .logs import StructuredLogger, current_context
from .redact import is_sensitive_key, redact_text

if TYPE_CHECKING:
    from .breaker import CircuitBreaker
    from .ratelimit import RateLimiter

__all__ = ["CORRELATION_HEADER", "ServiceClient", "ServiceResponse", "parse_retry_after"]

CORRELATION_HEADER = "X-Correlation-ID"
_DELAY_SECONDS = re.compile(r"^[0-9]+(?:\.[0-9]*)?$")
_MAX_SNIPPET = 200


def parse_retry_after(
    value: str | None, *, now: datetime | None = None, max_delay: float = 300.0
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 section 10.2.3).

    Accepts delay-seconds (``"120"``; a fraction is tolerated) or an HTTP-date; the
    result is clamped to ``[0, max_delay]``. ``None`` when absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    ceiling = max(0.0, max_delay)
    match = _DELAY_SECONDS.match(text)
    if match is not None:
        return min(float(text), ceiling)
    if text[0] in "+-" or text.replace(".", "", 1).isdigit():
        return None  # negative or malformed numbers are not dates either
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # "-0000" dates: RFC 9110 dates are GMT
    delay = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(delay):
        return None
    return min(max(delay, 0.0), ceiling)


@dataclass(frozen=True, slots=True)
class ServiceResponse:
    """A successful response, fully read."""

    status: int
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding, errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON; ``PermanentError`` when it is not JSON."""
        try:
            return jsonlib.loads(self.body)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            raise PermanentError("response body is not valid JSON") from None


class ServiceClient:
    """An HTTP client for one external service.

    Args:
        name: the service, used in errors and logs (and as the breaker's usual name).
        base_url: prefix of every request path.
        breaker: a CircuitBreaker guarding the service (e.g. ``ctx.breaker(name)``).
        rate_limiter: a TokenBucket (or fleet-wide bucket) every request takes a token from first.
        timeout: seconds for one request, connection to last body byte.
        headers: sent with every request; values of sensitive ones (authorization,
            api keys, tokens) never appear in messages.
        session: an ``aiohttp.ClientSession`` to share (left open by ``close``);
            by default one is opened on first use.
        max_retry_after: the clamp of ``Retry-After``.
        max_rate_wait: rate-limit waits longer than this raise ``RetryableError``.
        secrets: further strings to scrub from error text.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        breaker: CircuitBreaker | None = None,
        rate_limiter: RateLimiter | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        max_retry_after: float = 300.0,
        max_rate_wait: float | None = None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"service {name!r}: base_url must be an http:// or https:// URL")
        if timeout <= 0:
            raise ValueError(f"service {name!r}: timeout must be > 0")
        self.name = name
        self.base_url = base_url
        self.breaker = breaker
        self.rate_limiter = rate_limiter
        self.timeout = float(timeout)
        self.max_retry_after = max_retry_after
        self.max_rate_wait = max_rate_wait
        self._headers = dict(headers or {})
        sensitive = [v for k, v in self._headers.items() if is_sensitive_key(k) and v]
        # "Bearer <token>": a service echoing the token back quotes it without the scheme.
        sensitive += [v.split()[-1] for v in sensitive if v.split()]
        self._secrets = tuple(s for s in (*secrets, *sensitive) if s)
        self._session = session
        self._owns_session = session is None
        self._log = StructuredLogger("worker_core.http", service=name)

    def __repr__(self) -> str:
        return f"ServiceClient({self.name!r}, {redact_text(self.base_url.split('?', 1)[0])!r})"

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session this client opened (a given session is left open)."""
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def request(
        self,
        method: str,
        path: str = "",
        *,
        json: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
        validate: Callable[[ServiceResponse], None] | None = None,
    ) -> ServiceResponse:
        """Send one request and return the response, or raise the mapped error.

        ``correlation_id`` defaults to the running job's (bound by the worker).
        ``validate`` checks a successful response inside the breaker call: what it
        raises counts as the service's failure (a wrong answer, not a bad request).

        Raises:
            RetryableError: 429, or 503 with ``Retry-After``; or a rate-limit wait
                above ``max_rate_wait``.
            TransientError: another 5xx, a timeout or a connection error.
            PermanentError: another 4xx, or an invalid URL.
            CircuitOpenError: the breaker refused the call; nothing was sent.
        """
        if self.rate_limiter is not None:
            await self.rate_limiter.acquire(max_wait=self.max_rate_wait)
        sent = dict(self._headers)
        if headers:
            sent.update(headers)
        correlation = correlation_id or current_context().get("correlation_id")
        if correlation:
            sent[CORRELATION_HEADER] = str(correlation)
        args = (method.upper(), path, json, data, params, sent, timeout or self.timeout, validate)
        if self.breaker is not None:
            return await self.breaker.call(self._send, *args)
        return await self._send(*args)

    async def _send(
        self,
        method: str,
        path: str,
        json: Any,
        data: bytes | None,
        params: Mapping[str, str] | None,
        headers: dict[str, str],
        timeout: float,
        validate: Callable[[ServiceResponse], None] | None = None,
    ) -> ServiceResponse:
        url = self._url(path)
        where = f"{self.name}: {method} {self._shown(path)}"
        detail: dict[str, Any] = {"service": self.name, "method": method, "path": self._shown(path)}
        started = time.monotonic()
        try:
            # Inside the breaker call: a timeout is a failure the breaker sees.
            async with asyncio.timeout(timeout):
                async with self._client().request(
                    method, url, json=json, data=data, params=params, headers=headers
                ) as resp:
                    body = await resp.read()
                    status, resp_headers = resp.status, resp.headers
        except TimeoutError:
            raise TransientError(f"{where} timed out after {timeout:g}s", **detail) from None
        except aiohttp.InvalidURL:
            raise PermanentError(f"{where}: invalid URL", **detail) from None
        except aiohttp.ClientError as exc:
            reason = self._scrub(str(exc))[:_MAX_SNIPPET]
            raise TransientError(
                f"{where} failed: {type(exc).__name__}: {reason}", **detail
            ) from None
        seconds = time.monotonic() - started
        self._log.debug(
            "http response",
            method=method,
            path=detail["path"],
            status=status,
            seconds=round(seconds, 6),
        )
        if status < 400:
            response = ServiceResponse(status, CIMultiDict(resp_headers), body)
            if validate is not None:
                validate(response)
            return response
        detail["status"] = status
        message = f"{where} -> HTTP {status}"
        snippet = self._scrub(body[:_MAX_SNIPPET].decode("utf-8", errors="replace")).strip()
        if snippet:
            message += f": {snippet}"
        retry_after = parse_retry_after(
            resp_headers.get("Retry-After"), max_delay=self.max_retry_after
        )
        if status == 429 or (status == 503 and retry_after is not None):
            raise RetryableError(message, retry_after=retry_after, **detail)
        if status >= 500:
            raise TransientError(message, **detail)
        raise PermanentError(message, **detail)

    def _url(self, path: str) -> str:
        if not path:
            return self.base_url
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url.rstrip('/')}/{path.lstrip('/')}"

    @staticmethod
    def _shown(path: str) -> str:
        # Query strings often carry keys; they are never quoted.
        return path.split("?", 1)[0] or "/"

    def _scrub(self, text: str) -> str:
        return redact_text(text, self._secrets)

"""Who may use the dashboard: the token, sessions, CSRF, allowed hosts, login limits.

With ``dashboard.token`` set, a browser logs in once with it and gets a session
cookie (HttpOnly, SameSite=Strict; Secure over https); API clients send
``Authorization: Bearer <token>``. Without a token (loopback only) a browser gets
a session cookie on its first page, so its forms still carry a CSRF token, and the
Host header must be a loopback name (a DNS-rebinding page cannot reach it).

Sessions are stateless: the cookie is ``id.expiry.signature`` (HMAC-SHA256 with a
key derived from the token, so sessions survive restarts and are shared by
replicas, and rotating the token logs everyone out; random per process without a
token). The CSRF token of a session is an HMAC of its id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COOKIE", "LoginLimiter", "Security", "Session", "is_loopback_host"]

COOKIE = "wc_session"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a Host header (``[::1]:8787`` → ``::1``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    expires: int
    csrf: str


class Security:
    """Token checks, session cookies and CSRF tokens of one dashboard.

    Args:
        token: the dashboard token (None: loopback only, no login).
        session_seconds: how long a session lasts.
        clock: wall-clock seconds.
    """

    def __init__(
        self,
        token: str | None,
        *,
        session_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.session_seconds = session_seconds
        self._clock = clock
        if token is not None:
            self._key = hashlib.sha256(
                b"worker_core.dashboard.session\x00" + token.encode()
            ).digest()
            self._token_digest = hashlib.sha256(token.encode()).digest()
        else:
            self._key = secrets.token_bytes(32)
            self._token_digest = b""

    def __repr__(self) -> str:
        return f"Security(token={'***' if self.token else None})"

    @property
    def needs_login(self) -> bool:
        return self.token is not None

    def token_ok(self, candidate: str) -> bool:
        """Constant-time comparison with the token (False without one)."""
        if self.token is None:
            return False
        digest = hashlib.sha256(candidate.encode("utf-8", "replace")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def bearer_ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def new_session(self) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        sid = _b64(secrets.token_bytes(18))
        expires = int(self._clock() + self.session_seconds)
        body = f"{sid}.{expires}"
        return Session(sid, expires, self._sign(f"csrf:{sid}")), f"{body}.{self._sign(body)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session of a cookie value, if it is genuine and not expired."""
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        sid, expires, signature = parts
        if not hmac.compare_digest(signature, self._sign(f"{sid}.{expires}")):
            return None
        if int(expires) < self._clock():
            return None
        return Session(sid, int(expires), self._sign(f"csrf:{sid}"))

    @staticmethod
    def csrf_ok(session: Session, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(session.csrf, candidate or "")


class LoginLimiter:
    """At most ``attempts`` failed logins per client address per ``window`` seconds.

    Bounded: it remembers ``max_clients`` addresses (the oldest are forgotten).
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        window: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def blocked_for(self, client: str) -> float:
        """Seconds before ``client`` may try again (0: now)."""
        entry = self._failures.get(client)
        if entry is None:
            return 0.0
        start, count = entry
        left = start + self.window - self._clock()
        if left <= 0:
            del self._failures[client]
            return 0.0
        return left if count >= self.attempts else 0.0

    def failed(self, client: str) -> None:
        now = self._clock()
        start, count = self._failures.pop(client, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        self._failures[client] = (start, count + 1)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

"""The dashboard's shared state and the middleware every request passes.

``guard`` refuses bytes that are not UTF-8, answers only loopback Host names when
no token is set (DNS rebinding), authenticates the caller (bearer token or session
cookie) where a token is set, demands a same-origin browser session with its CSRF
token (or a valid bearer token) for every POST, refuses every action in read-only
mode, and puts a strict Content-Security-Policy and friends on every response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from worker_core.logs import StructuredLogger
from worker_core.redact import redact_text

from . import _pages as pages
from ._data import ConsoleData, Schedules
from ._html import Markup
from ._params import BadRequest, check_utf8, parse_form, parse_json
from ._security import COOKIE, LoginLimiter, Security, Session, host_name, is_loopback_host

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from worker_core.config import WorkerConfig
    from worker_core.queue import Queue

__all__ = [
    "BEARER_KEY", "CONSOLE", "FORM_KEY", "JSON_KEY", "SESSION_KEY", "Console", "guard",
    "html_response", "json_response", "local_path", "secure", "set_cookie",
]  # fmt: skip

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on
    # the dashboard's own form posts, which the same-origin check must refuse.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Console:
    """The state one dashboard application shares between requests."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        read_only: bool,
        schedules: Schedules | None,
        queue: Queue | None,
    ) -> None:
        settings = config.dashboard
        token = settings.token.get_secret_value() if settings.token is not None else None
        self.config = config
        self.read_only = read_only
        self.security = Security(token, session_seconds=settings.session_hours * 3600)
        self.limiter = LoginLimiter()
        self.schedules = schedules
        self.allowed_hosts = {settings.host.lower()}
        self.streams = 0
        self.closing = asyncio.Event()
        self._given_queue = queue
        self._pool: AsyncConnectionPool | None = None
        self._data: ConsoleData | None = None
        self._log = StructuredLogger("worker_core.dashboard")

    @property
    def data(self) -> ConsoleData:
        if self._data is None:
            raise RuntimeError("the dashboard application has not started")
        return self._data

    async def open(self, app: web.Application) -> None:
        from worker_core.queue import Queue

        queue = self._given_queue
        if queue is None:
            self._pool = await _open_pool(self.config)
            queue = Queue(self.config, pool=self._pool)
        self._data = ConsoleData(
            queue,
            refresh_seconds=self.config.dashboard.refresh_seconds,
            secrets=self.config.secrets(),
            schedules=self.schedules,
        )

    async def shutdown(self, app: web.Application) -> None:
        self.closing.set()

    async def close(self, app: web.Application) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def view(self, request: web.Request) -> pages.View:
        session: Session | None = request.get(SESSION_KEY)
        return pages.View(
            schema=self.config.database.schema,
            csrf=None if self.read_only or session is None else session.csrf,
            read_only=self.read_only,
            logged_in=self.security.needs_login and session is not None,
            path=request.path,
        )


async def _open_pool(config: WorkerConfig) -> AsyncConnectionPool:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from worker_core._connect import behind_pooler

    timeout_ms = int(config.dashboard.statement_timeout * 1000)

    async def configure(conn: AsyncConnection[Any]) -> None:
        # A slow dashboard query gives up instead of holding a connection or locks.
        # A session setting: never through a pooler, where it would stick to a server
        # connection other clients get next (the pages then run without the limit).
        if not await behind_pooler(conn):
            await conn.execute(f"SET statement_timeout = {timeout_ms}")

    db = config.database
    pool = AsyncConnectionPool(
        config.dsn(),
        min_size=1,
        max_size=4,
        open=False,
        kwargs={
            "autocommit": True,
            "prepare_threshold": db.prepare_threshold,
            "application_name": f"{db.application_name[:50]}.dashboard",
            "connect_timeout": max(1, int(db.connect_timeout)),
        },
        configure=configure,
        name=f"worker_core.dashboard.{db.schema}",
        timeout=db.connect_timeout,
    )
    try:
        await pool.open(wait=True, timeout=db.connect_timeout)
    except Exception:
        await pool.close()
        from worker_core.redact import mask_dsn

        raise ConnectionError(f"cannot connect to PostgreSQL at {mask_dsn(config.dsn())}") from None
    return pool


CONSOLE: web.AppKey[Console] = web.AppKey("worker_core.console", Console)


def _request_key(name: str, kind: type) -> Any:
    # Typed request keys (aiohttp >= 3.14, which warns about plain string keys).
    factory = getattr(web, "RequestKey", None)
    return name if factory is None else factory(f"worker_core.{name}", kind)


SESSION_KEY = _request_key("session", Session)
BEARER_KEY = _request_key("bearer", bool)
JSON_KEY = _request_key("json", dict)
FORM_KEY = _request_key("form", dict)


def secure(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def json_response(data: Any, status: int = 200) -> web.Response:
    text = json.dumps(data, default=json_default, ensure_ascii=False, allow_nan=False)
    return web.Response(text=text, status=status, content_type="application/json")


def html_response(body: Markup, status: int = 200) -> web.Response:
    return web.Response(text=str(body), status=status, content_type="text/html", charset="utf-8")


def _error(request: web.Request, status: int, text: str) -> web.Response:
    if request.path.startswith("/api/") or request.path.startswith("/charts/"):
        return json_response({"error": text}, status=status)
    console = request.app[CONSOLE]
    view = pages.View(console.config.database.schema, None, console.read_only, False, request.path)
    return html_response(pages.message(view, f"Error {status}", text), status=status)


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return False
    site = request.headers.get("Sec-Fetch-Site")
    return site is None or site in ("same-origin", "none")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, CSRF, input encoding and security headers for every request."""
    console = request.app[CONSOLE]
    try:
        response = await _guarded(request, handler, console)
    except BadRequest as exc:
        response = _error(request, 400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects: aiohttp sends the exception itself
            for name, value in SECURITY_HEADERS.items():
                exc.headers.setdefault(name, value)
            raise
        response = _error(request, exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        console._log.error(
            "dashboard request failed",
            path=request.path[:200],
            error_type=type(exc).__name__,
            error=redact_text(str(exc), console.config.secrets())[:300],
        )
        response = _error(request, 500, "internal error (see the dashboard's log)")
    if not response.prepared:
        secure(response)
    return response


async def _guarded(request: web.Request, handler: Handler, console: Console) -> web.StreamResponse:
    check_utf8(request.raw_path.split("?", 1)[0], "path")
    check_utf8(request.rel_url.raw_query_string, "query string")
    security = console.security
    if not security.needs_login:
        name = host_name(request.host).lower()
        if not (is_loopback_host(name) or name in console.allowed_hosts):
            raise web.HTTPForbidden(
                reason="Host not allowed: without dashboard.token the "
                "dashboard answers loopback names only"
            )
    public = request.path == "/login" or request.path.startswith("/static/")
    new_cookie: str | None = None
    auth = request.headers.get("Authorization")
    if security.needs_login and auth is not None:
        if not security.bearer_ok(auth):
            return _unauthorized(request, console, "invalid bearer token")
        request[BEARER_KEY] = True
    else:
        session = security.session(request.cookies.get(COOKIE))
        if session is None and not security.needs_login and request.method == "GET":
            session, new_cookie = security.new_session()
        if session is not None:
            request[SESSION_KEY] = session
        elif security.needs_login and not public:
            return _unauthorized(request, console, "authentication required")
    if request.method == "POST":
        await _check_post(request, console, public)
    response = await handler(request)
    if new_cookie is not None and not response.prepared:
        set_cookie(request, response, new_cookie, console)
    return response


async def _check_post(request: web.Request, console: Console, public: bool) -> None:
    if not _same_origin(request):
        raise web.HTTPForbidden(reason="cross-site request refused")
    body = await request.read()
    if request.content_type == "application/json":
        request[JSON_KEY] = parse_json(body)
    else:
        request[FORM_KEY] = parse_form(body)
    if public:
        return  # the login form: no session yet, same-origin checked above
    if console.read_only and request.path.startswith("/api/"):
        raise web.HTTPForbidden(reason="the dashboard is read-only: no action is allowed")
    if request.get(BEARER_KEY):
        return  # a bearer token is not sent by browsers on their own: no CSRF
    session: Session | None = request.get(SESSION_KEY)
    form: dict[str, list[str]] = request.get(FORM_KEY, {})
    candidate = request.headers.get("X-CSRF-Token") or (form.get("csrf") or [""])[0]
    if session is None or not console.security.csrf_ok(session, candidate):
        raise web.HTTPForbidden(reason="missing or wrong CSRF token (reload the page)")


def _unauthorized(request: web.Request, console: Console, reason: str) -> web.Response:
    if request.path.startswith("/api/") or request.path.startswith("/charts/"):
        response = json_response({"error": reason}, status=401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="worker_core"'
        return response
    return html_response(pages.login(None, local_path(request.path_qs)), status=401)


def set_cookie(
    request: web.Request, response: web.StreamResponse, value: str, console: Console
) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=int(console.security.session_seconds),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def local_path(path: str | None) -> str:
    """``path`` if it is a local path (no scheme, no //host, no backslash), else /."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path[:2000]

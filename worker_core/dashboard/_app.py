"""The aiohttp application: routes, the security middleware, pages, API and actions.

Every request passes ``_guard``: bytes that are not UTF-8 are refused, the Host
header must be a loopback name when no token is set (DNS rebinding), the caller
must be authenticated (bearer token or session cookie) where a token is set,
every POST needs a same-origin browser session with its CSRF token (or a valid
bearer token), read-only mode refuses every action, and every response carries a
strict Content-Security-Policy and friends. Handlers read inputs only through
``_params`` and render only through ``_pages`` (escaped by construction).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from worker_core.jobs import JobStatus
from worker_core.logs import StructuredLogger
from worker_core.redact import redact_text

from . import _pages as pages
from ._charts import bars
from ._data import Cached, ConsoleData, Schedules, series
from ._html import Markup, h
from ._params import (
    MAX_ID,
    BadRequest,
    Params,
    check_utf8,
    job_id,
    parse_form,
    parse_ids,
    parse_json,
)
from ._security import COOKIE, LoginLimiter, Security, Session, host_name, is_loopback_host

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from worker_core.config import WorkerConfig
    from worker_core.queue import Queue

__all__ = ["CONSOLE", "Console"]

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
NOTICES = {
    "cancelled": "Cancelled.",
    "not_cancelled": "Not cancelled: only queued and dead jobs can be cancelled now "
    "(running ones too once the job model supports it), and finished jobs cannot.",
    "requeued": "Requeued.",
    "not_requeued": "Nothing requeued: only dead jobs can be requeued.",
    "paused": "Paused: workers claim nothing from this queue until it is resumed.",
    "resumed": "Resumed.",
    "unchanged": "Nothing changed.",
}
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_LIMIT = 50
_PUBLIC = ("/login", "/static/")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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

    timeout_ms = int(config.dashboard.statement_timeout * 1000)

    async def configure(conn: AsyncConnection[Any]) -> None:
        # A slow dashboard query gives up instead of holding a connection or locks.
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


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def json_response(data: Any, status: int = 200) -> web.Response:
    text = json.dumps(data, default=_json_default, ensure_ascii=False, allow_nan=False)
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
    return html_response(pages.login(None, _local(request.path_qs)), status=401)


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


def _local(path: str | None) -> str:
    """``path`` if it is a local path (no scheme, no //host, no backslash), else /."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path[:2000]


def _redirect(request: web.Request, notice: str) -> web.Response:
    form: dict[str, list[str]] = request.get(FORM_KEY, {})
    target = _local((form.get("next") or ["/"])[0])
    joiner = "&" if "?" in target else "?"
    raise web.HTTPSeeOther(f"{target}{joiner}notice={notice}")


def _notice(params: Params) -> str | None:
    key = params.choice("notice", tuple(NOTICES))
    return None if key is None else NOTICES[key]


# -- pages -------------------------------------------------------------------------
def _with_notice(body: Markup, notice: str | None) -> Markup:
    if notice is None:
        return body
    return Markup(h("p", notice, class_="notice", role="status") + body)


async def overview_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, {"range", "notice"})
    chart_range = params.choice("range", ("hour", "day"), "hour") or "hour"
    data = await console.data.overview.get()
    body = pages.overview(console.view(request), data, chart_range)
    return html_response(pages.page(console.view(request), "Overview", body, live="overview"))


def _job_filters(params: Params) -> dict[str, Any]:
    status = params.choice("status", tuple(s.value for s in JobStatus))
    return {
        "queue": params.text("queue"),
        "kind": params.text("kind"),
        "status": status,
        "stage": params.text("stage"),
        "q": params.text("q", max_len=500),
    }


_JOB_PARAMS = {"queue", "kind", "status", "stage", "q", "before", "limit"}


async def _list_jobs(
    console: Console, params: Params
) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    filters = _job_filters(params)
    before = params.integer("before", lo=1, hi=MAX_ID)
    limit = params.integer("limit", lo=1, hi=500, default=_LIMIT) or _LIMIT
    rows = await console.data.list_jobs(
        queue=filters["queue"],
        kind=filters["kind"],
        status=filters["status"],
        stage=filters["stage"],
        search=filters["q"],
        before=before,
        limit=limit,
    )
    return rows, filters, limit


async def jobs_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, _JOB_PARAMS | {"notice"})
    rows, filters, limit = await _list_jobs(console, params)
    body = _with_notice(pages.jobs(console.view(request), rows, filters, limit), _notice(params))
    return html_response(pages.page(console.view(request), "Jobs", body))


async def job_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, {"notice"})
    ident = job_id(request.match_info["id"])
    job = await console.data.queue.get(ident)
    if job is None:
        raise web.HTTPNotFound(reason=f"job {ident} does not exist (or was pruned)")
    body = _with_notice(pages.job(console.view(request), console.data.job(job)), _notice(params))
    return html_response(pages.page(console.view(request), f"Job {ident}", body, live="refresh"))


async def dead_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, {"queue", "before", "notice"})
    queue = params.text("queue")
    before = params.integer("before", lo=1, hi=MAX_ID)
    rows = await console.data.list_jobs(queue=queue, status="dead", before=before, limit=_LIMIT)
    body = pages.dead(console.view(request), rows, queue, _LIMIT)
    page = pages.page(console.view(request), "Dead letters", _with_notice(body, _notice(params)))
    return html_response(page)


async def queues_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, {"notice"})
    data = await console.data.overview.get()
    body = _with_notice(pages.queues(console.view(request), data), _notice(params))
    return html_response(pages.page(console.view(request), "Queues", body, live="refresh"))


async def workers_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    Params(request.query, ())
    rows = await console.data.workers()
    body = pages.workers(console.view(request), rows)
    return html_response(pages.page(console.view(request), "Workers", body, live="refresh"))


async def breakers_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    Params(request.query, ())
    rows = await console.data.breakers()
    body = pages.breakers(console.view(request), rows)
    return html_response(pages.page(console.view(request), "Breakers", body, live="refresh"))


async def schedules_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    Params(request.query, ())
    body = pages.schedules(console.view(request), await console.data.schedules())
    return html_response(pages.page(console.view(request), "Schedules", body))


async def chart(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, {"range", "queue", "t"})
    name = request.match_info["name"]
    if name not in ("throughput", "failures"):
        raise web.HTTPNotFound(reason=f"no chart {name[:40]!r}")
    chart_range = params.choice("range", ("hour", "day"), "hour")
    params.integer("t", lo=0, hi=MAX_ID)  # a cache buster, checked like any input
    minutes, step = (60, 1) if chart_range == "hour" else (24 * 60, 15)
    rows = await console.data.history(params.text("queue"), minutes)
    if name == "throughput":
        xs, values = series(rows, minutes=minutes, step=step, fields=("succeeded", "failed"))
        svg = bars(
            f"jobs per {step} min",
            xs,
            [
                ("succeeded", "#2f9e44", values["succeeded"]),
                ("failed", "#e03131", values["failed"]),
            ],
        )
    else:
        fields = ("retried", "deferred", "dead_lettered")
        xs, values = series(rows, minutes=minutes, step=step, fields=fields)
        svg = bars(
            f"failed attempts per {step} min",
            xs,
            [
                ("retried", "#f08c00", values["retried"]),
                ("deferred", "#1c7ed6", values["deferred"]),
                ("dead", "#c2255c", values["dead_lettered"]),
            ],
            unit="attempts",
        )
    return web.Response(text=str(svg), content_type="image/svg+xml", charset="utf-8")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound(reason="no such file")
    text = (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")
    response = web.Response(text=text, content_type=_STATIC[name], charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return response


# -- login -------------------------------------------------------------------------
async def login_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    params = Params(request.query, {"next"})
    if not console.security.needs_login or request.get(SESSION_KEY) is not None:
        raise web.HTTPSeeOther(_local(params.text("next", max_len=2000)))
    return html_response(pages.login(None, _local(params.text("next", max_len=2000))))


async def login(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    form: dict[str, list[str]] = request.get(FORM_KEY, {})
    target = _local((form.get("next") or ["/"])[0])
    if not console.security.needs_login:
        raise web.HTTPSeeOther(target)
    client = request.remote or "?"
    wait = console.limiter.blocked_for(client)
    if wait > 0:
        page = pages.login(f"Too many failed attempts: try again in {wait:.0f} s.", target)
        return html_response(page, status=429)
    if not console.security.token_ok((form.get("token") or [""])[0]):
        console.limiter.failed(client)
        console._log.warning("dashboard login failed", client=client)
        return html_response(pages.login("Wrong token.", target), status=401)
    console.limiter.succeeded(client)
    _, cookie = console.security.new_session()
    response = web.HTTPSeeOther(target)
    set_cookie(request, response, cookie, console)
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


# -- API ---------------------------------------------------------------------------
async def api_overview(request: web.Request) -> web.Response:
    Params(request.query, ())
    return json_response(await request.app[CONSOLE].data.overview.get())


async def api_jobs(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    rows, _, limit = await _list_jobs(console, Params(request.query, _JOB_PARAMS))
    return json_response({"jobs": rows, "next": rows[-1]["id"] if len(rows) >= limit else None})


async def api_job(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    Params(request.query, ())
    ident = job_id(request.match_info["id"])
    job = await console.data.queue.get(ident)
    if job is None:
        raise web.HTTPNotFound(reason=f"job {ident} does not exist (or was pruned)")
    return json_response(console.data.job(job))


async def api_queues(request: web.Request) -> web.Response:
    Params(request.query, ())
    data = await request.app[CONSOLE].data.overview.get()
    return json_response({"queues": data["queues"]})


async def api_workers(request: web.Request) -> web.Response:
    Params(request.query, ())
    return json_response({"workers": await request.app[CONSOLE].data.workers()})


async def api_breakers(request: web.Request) -> web.Response:
    Params(request.query, ())
    return json_response({"breakers": await request.app[CONSOLE].data.breakers()})


async def api_schedules(request: web.Request) -> web.Response:
    Params(request.query, ())
    return json_response({"schedules": await request.app[CONSOLE].data.schedules()})


async def api_history(request: web.Request) -> web.Response:
    params = Params(request.query, {"minutes", "queue", "stages"})
    minutes = params.integer("minutes", lo=1, hi=7 * 24 * 60, default=60) or 60
    stages = params.choice("stages", ("0", "1", "false", "true"), "0") in ("1", "true")
    rows = await request.app[CONSOLE].data.queue.history(
        minutes, params.text("queue"), stages=stages
    )
    return json_response({"history": rows})


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the overview whenever it changes (pings in between)."""
    console = request.app[CONSOLE]
    Params(request.query, ())
    if console.streams >= console.config.dashboard.max_streams:
        raise web.HTTPServiceUnavailable(reason="too many live connections; retry later")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    secure(response)
    console.streams += 1
    try:
        await response.prepare(request)
        await _stream(console, response)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        console.streams -= 1
    return response


async def _stream(console: Console, response: web.StreamResponse) -> None:
    refresh = console.config.dashboard.refresh_seconds
    cache: Cached[dict[str, Any]] = console.data.overview
    deadline = time.monotonic() + 300  # the browser reconnects, and is authenticated again
    last_key, last_write = "", 0.0
    await response.write(f"retry: {int(refresh * 1000)}\n\n".encode())
    while time.monotonic() < deadline and not console.closing.is_set():
        message = b""
        try:
            data = await cache.get()
        except Exception as exc:  # the database is away: say so and keep the stream
            console._log.warning("live update failed", error_type=type(exc).__name__)
            message = b": database unavailable\n\n"
        else:
            # Sent when something but the timestamp changed.
            key = json.dumps({k: v for k, v in data.items() if k != "generated_at"},
                             default=_json_default, sort_keys=True)  # fmt: skip
            if key != last_key:
                last_key = key
                payload = json.dumps(data, default=_json_default)
                message = f"event: overview\ndata: {payload}\n\n".encode()
        if not message and time.monotonic() - last_write >= 15:
            message = b": ping\n\n"
        if message:
            await response.write(message)
            last_write = time.monotonic()
        try:
            async with asyncio.timeout(refresh):
                await console.closing.wait()
        except TimeoutError:
            pass


# -- actions -----------------------------------------------------------------------
def _done(request: web.Request, data: dict[str, Any], notice: str) -> web.Response:
    request.app[CONSOLE].data.invalidate()
    if FORM_KEY in request and not request.get(BEARER_KEY):
        _redirect(request, notice)  # a browser form: back to the page it came from
    return json_response(data)


async def cancel_job(request: web.Request) -> web.Response:
    queue = request.app[CONSOLE].data.queue
    ident = job_id(request.match_info["id"])
    job = await queue.get(ident)
    if job is None:
        raise web.HTTPNotFound(reason=f"job {ident} does not exist")
    if job.status is JobStatus.DEAD:
        done = await queue.discard([ident]) == 1
    else:
        done = await queue.cancel(ident)
    return _done(
        request, {"id": ident, "cancelled": done}, "cancelled" if done else "not_cancelled"
    )


async def requeue_job(request: web.Request) -> web.Response:
    ident = job_id(request.match_info["id"])
    done = await request.app[CONSOLE].data.queue.requeue([ident]) == 1
    return _done(request, {"id": ident, "requeued": done}, "requeued" if done else "not_requeued")


def _ids(request: web.Request) -> list[int]:
    if JSON_KEY in request:
        return parse_ids(request[JSON_KEY].get("ids"))
    return parse_ids(request[FORM_KEY].get("ids"))


async def requeue_jobs(request: web.Request) -> web.Response:
    ids = _ids(request)
    n = await request.app[CONSOLE].data.queue.requeue(ids)
    return _done(request, {"requeued": n, "of": len(ids)}, "requeued" if n else "not_requeued")


async def cancel_jobs(request: web.Request) -> web.Response:
    queue = request.app[CONSOLE].data.queue
    ids = _ids(request)
    n = await queue.discard(ids)
    if n < len(ids):
        for ident in ids:
            n += int(await queue.cancel(ident))
    return _done(request, {"cancelled": n, "of": len(ids)}, "cancelled" if n else "not_cancelled")


async def pause_queue(request: web.Request) -> web.Response:
    name = _queue_param(request)
    changed = await request.app[CONSOLE].data.queue.pause(name, by="dashboard")
    return _done(request, {"queue": name, "paused": True, "changed": changed}, "paused")


async def resume_queue(request: web.Request) -> web.Response:
    name = _queue_param(request)
    changed = await request.app[CONSOLE].data.queue.resume(name)
    return _done(request, {"queue": name, "paused": False, "changed": changed}, "resumed")


def _queue_param(request: web.Request) -> str:
    from ._params import clean_text

    name = clean_text("queue", request.match_info["name"], 200)
    if not name.strip():
        raise BadRequest("queue must not be blank")
    return name


def add_routes(app: web.Application) -> None:
    get, post = app.router.add_get, app.router.add_post
    for path, handler in (
        ("/", overview_page),
        ("/jobs", jobs_page),
        ("/jobs/{id}", job_page),
        ("/dead", dead_page),
        ("/queues", queues_page),
        ("/workers", workers_page),
        ("/breakers", breakers_page),
        ("/schedules", schedules_page),
        ("/login", login_page),
        ("/charts/{name}.svg", chart),
        ("/static/{name}", static),
        ("/api/overview", api_overview),
        ("/api/jobs", api_jobs),
        ("/api/jobs/{id}", api_job),
        ("/api/queues", api_queues),
        ("/api/workers", api_workers),
        ("/api/breakers", api_breakers),
        ("/api/history", api_history),
        ("/api/schedules", api_schedules),
        ("/api/events", api_events),
    ):
        get(path, handler, allow_head=False)
    for path, handler in (
        ("/login", login),
        ("/logout", logout),
        ("/api/jobs/requeue", requeue_jobs),
        ("/api/jobs/cancel", cancel_jobs),
        ("/api/jobs/{id}/cancel", cancel_job),
        ("/api/jobs/{id}/requeue", requeue_job),
        ("/api/queues/{name:.+}/pause", pause_queue),
        ("/api/queues/{name:.+}/resume", resume_queue),
    ):
        post(path, handler)

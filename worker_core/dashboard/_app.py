"""The dashboard's routes: pages, charts, login, the JSON API, live events, actions.

Every request has passed ``_guard.guard`` (authentication, CSRF, encodings,
headers) before a handler runs. Handlers read inputs only through ``_params`` and
render only through ``_pages`` (escaped by construction).
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import Any

from aiohttp import web

from worker_core.jobs import JobStatus

from . import _pages as pages
from ._charts import bars
from ._data import Cached, series
from ._guard import (
    BEARER_KEY,
    CONSOLE,
    FORM_KEY,
    JSON_KEY,
    SESSION_KEY,
    Console,
    html_response,
    json_default,
    json_response,
    local_path,
    secure,
    set_cookie,
)
from ._html import Markup, h
from ._params import MAX_ID, BadRequest, Params, job_id, parse_ids
from ._security import COOKIE

__all__ = ["add_routes"]

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


def _redirect(request: web.Request, notice: str) -> web.Response:
    form: dict[str, list[str]] = request.get(FORM_KEY, {})
    target = local_path((form.get("next") or ["/"])[0])
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
        raise web.HTTPSeeOther(local_path(params.text("next", max_len=2000)))
    return html_response(pages.login(None, local_path(params.text("next", max_len=2000))))


async def login(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    form: dict[str, list[str]] = request.get(FORM_KEY, {})
    target = local_path((form.get("next") or ["/"])[0])
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
                             default=json_default, sort_keys=True)  # fmt: skip
            if key != last_key:
                last_key = key
                payload = json.dumps(data, default=json_default)
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

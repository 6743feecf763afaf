"""The dashboard's HTML pages, rendered on the server from already-redacted data.

Every function returns ``Markup`` built with ``_html.h`` (escaped by
construction). ``View`` carries what every page needs: the session's CSRF token
(None: no actions are drawn, as in read-only mode) and the schema shown in the
footer. Counts carry ``data-queue`` and ``data-status`` attributes, which the
live updates of ``static/console.js`` (and the browser tests) look up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ._data import STATUSES, timeline
from ._html import Markup, ago, h, join, pretty_json, seconds, timestamp, url

__all__ = [
    "View",
    "action",
    "breakers",
    "dead",
    "job",
    "jobs",
    "login",
    "message",
    "overview",
    "page",
    "queues",
    "schedules",
    "workers",
]

NAV = (
    ("/", "Overview"),
    ("/jobs", "Jobs"),
    ("/dead", "Dead letters"),
    ("/queues", "Queues"),
    ("/workers", "Workers"),
    ("/breakers", "Breakers"),
    ("/schedules", "Schedules"),
)


@dataclass(frozen=True, slots=True)
class View:
    schema: str
    #: The CSRF token of the session; None when actions are off (read-only, no session).
    csrf: str | None
    read_only: bool
    logged_in: bool
    path: str = "/"


def page(view: View, title: str, body: Markup, *, live: str | None = None) -> Markup:
    """The whole document around ``body``."""
    nav = [
        h("a", label, href=href, aria_current="page" if view.path == href else None)
        for href, label in NAV
    ]
    mode = h("span", "read-only", class_="badge") if view.read_only else None
    logout = None
    if view.logged_in and view.csrf:
        logout = h(
            "form",
            _csrf(view),
            h("button", "Log out", type="submit"),
            method="post",
            action="/logout",
            class_="inline",
        )
    head = join(
        [
            h("meta", charset="utf-8"),
            h("meta", name="viewport", content="width=device-width, initial-scale=1"),
            h("meta", name="csrf-token", content=view.csrf) if view.csrf else None,
            h("title", f"{title} · worker_core"),
            h("link", rel="stylesheet", href="/static/console.css"),
            h("script", src="/static/console.js", defer=True),
        ]
    )
    header = h("header", h("strong", "worker_core"), h("nav", nav), mode, logout)
    footer = h(
        "footer", f"schema {view.schema}", " · ", h("span", "live", id="live-state", class_="muted")
    )
    doc = h(
        "html",
        h("head", head),
        h("body", header, h("main", h("h1", title), body, id="main"), footer, data_live=live),
        lang="en",
    )
    return Markup("<!doctype html>\n" + doc)


def _csrf(view: View) -> Markup | None:
    return h("input", type="hidden", name="csrf", value=view.csrf) if view.csrf else None


def action(view: View, path: str, label: str, *, back: str, danger: bool = False) -> Markup | None:
    """A one-button POST form, or nothing when actions are off."""
    if view.csrf is None or view.read_only:
        return None
    return h(
        "form",
        _csrf(view),
        h("input", type="hidden", name="next", value=back),
        h("button", label, type="submit", class_="danger" if danger else None),
        method="post",
        action=path,
        class_="inline",
    )


def _status(status: str) -> Markup:
    return h("span", status, class_=f"status s-{status}")


def _table(head: Sequence[str], rows: Iterable[Markup], empty: str) -> Markup:
    body = list(rows)
    if not body:
        return h("p", empty, class_="empty")
    return h("table", h("thead", h("tr", [h("th", c) for c in head])), h("tbody", body))


# -- overview ----------------------------------------------------------------------
def overview(view: View, data: dict[str, Any], chart_range: str) -> Markup:
    queues = data["queues"]
    alerts = data["alerts_firing"]
    banner = None
    if alerts:
        banner = h(
            "div",
            h("strong", "Alerts firing: "),
            ", ".join(f"{a['alert']} on {a['queue']} ({a['value']:g})" for a in alerts),
            class_="alert",
            role="alert",
            id="alerts",
        )
    summary = h(
        "p",
        h("span", data["workers_alive"], data_field="workers_alive"),
        " live workers · ",
        h("span", data["workers_gone"], data_field="workers_gone"),
        " gone · updated ",
        h(
            "time",
            data["generated_at"][11:19] + " UTC",
            datetime=data["generated_at"],
            data_field="generated_at",
        ),
        class_="muted",
    )
    head = [
        "queue",
        *STATUSES,
        "ready",
        "scheduled",
        "oldest ready",
        "p50",
        "p95",
        "done/h",
        "failed/h",
        "workers",
    ]
    rows = [_overview_row(q) for q in queues]
    rows.append(_total_row(data["totals"]))
    table = h(
        "table",
        h("thead", h("tr", [h("th", c) for c in head])),
        h("tbody", rows, id="overview-rows"),
        class_="counts",
    )
    links = [
        h("a", label, href=url("/", range=key), aria_current="page" if key == chart_range else None)
        for key, label in (("hour", "last hour"), ("day", "last day"))
    ]
    picker = h("p", "Charts: ", links[0], " · ", links[1], class_="muted")
    charts = [
        h(
            "img",
            src=url(f"/charts/{name}.svg", range=chart_range),
            alt=alt,
            width=640,
            height=180,
            class_="chart",
            data_chart=name,
        )
        for name, alt in (
            ("throughput", "jobs succeeded and failed per interval"),
            ("failures", "retries, deferrals and dead letters per interval"),
        )
    ]
    return join([banner, summary, table, picker, h("div", charts, class_="charts")])


def _count(queue: str, status: str, value: int) -> Markup:
    return h("td", value, data_queue=queue, data_status=status, class_="num")


def _field(queue: str, name: str, text: str) -> Markup:
    return h("td", text, data_queue=queue, data_field=name, class_="num")


def _overview_row(q: dict[str, Any]) -> Markup:
    name = q["queue"]
    label = [
        h("a", name, href=url("/jobs", queue=name)),
        h(
            "span",
            " paused",
            class_="badge",
            data_queue=name,
            data_field="paused",
            hidden=not q["paused"],
        ),
    ]
    return h(
        "tr",
        h("th", label, scope="row"),
        [_count(name, s, q["counts"][s]) for s in STATUSES],
        _field(name, "ready", str(q["ready"])),
        _field(name, "scheduled", str(q["scheduled"])),
        _field(name, "oldest_ready_seconds", seconds(q["oldest_ready_seconds"])),
        _field(name, "p50_seconds", seconds(q["p50_seconds"])),
        _field(name, "p95_seconds", seconds(q["p95_seconds"])),
        _field(name, "succeeded_1h", str(q["succeeded_1h"])),
        _field(name, "failed_1h", str(q["failed_1h"])),
        _field(name, "workers", str(q["workers"])),
        data_row=name,
    )


def _total_row(totals: dict[str, int]) -> Markup:
    return h(
        "tr",
        h("th", "all queues", scope="row"),
        [_count("*", s, totals[s]) for s in STATUSES],
        h("td", colspan=9),
        class_="total",
    )


# -- jobs --------------------------------------------------------------------------
def jobs(view: View, rows: list[dict[str, Any]], filters: dict[str, Any], limit: int) -> Markup:
    def field(name: str, label: str, control: Markup) -> Markup:
        return h("label", label, " ", control)

    status_select = h(
        "select",
        h("option", "any status", value=""),
        [h("option", s, value=s, selected=filters.get("status") == s) for s in STATUSES],
        name="status",
    )
    form = h(
        "form",
        [
            field("queue", "queue", h("input", name="queue", value=filters.get("queue"), size=12)),
            field("kind", "kind", h("input", name="kind", value=filters.get("kind"), size=10)),
            field("status", "status", status_select),
            field("stage", "stage", h("input", name="stage", value=filters.get("stage"), size=10)),
            field(
                "q",
                "search",
                h(
                    "input",
                    name="q",
                    value=filters.get("q"),
                    size=24,
                    placeholder="id, correlation id, key or key=value",
                ),
            ),
            h("button", "Filter", type="submit"),
        ],
        method="get",
        action="/jobs",
        class_="filters",
    )
    table = _table(
        ["id", "queue", "kind", "status", "stage", "attempt", "run at", "updated", "last error"],
        (_job_row(r) for r in rows),
        "No job matches.",
    )
    more = None
    if len(rows) >= limit:
        more = h(
            "p",
            h(
                "a",
                "Older jobs →",
                href=url("/jobs", **filters, before=rows[-1]["id"]),
                rel="next",
                id="older",
            ),
        )
    return join([form, table, more])


def _error_line(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    return f"{error.get('type', '?')}: {str(error.get('message', ''))[:160]}"


def _job_row(r: dict[str, Any]) -> Markup:
    return h(
        "tr",
        h("td", h("a", r["id"], href=f"/jobs/{r['id']}")),
        h("td", r["queue"]),
        h("td", r["kind"]),
        h("td", _status(r["status"])),
        h("td", r["stage"] or "—"),
        h("td", f"{r['attempt']}/{r['max_attempts']}"),
        h("td", timestamp(r["run_at"])),
        h("td", ago(r["updated_at"])),
        h("td", _error_line(r["last_error"]), class_="err"),
        data_job=r["id"],
    )


def job(view: View, j: dict[str, Any]) -> Markup:
    back = f"/jobs/{j['id']}"
    actions = []
    if j["status"] in ("queued", "running", "dead"):
        actions.append(
            action(view, f"/api/jobs/{j['id']}/cancel", "Cancel", back=back, danger=True)
        )
    if j["status"] == "dead":
        actions.append(action(view, f"/api/jobs/{j['id']}/requeue", "Requeue", back=back))
    facts = [
        ("status", _status(j["status"])),
        ("queue", j["queue"]),
        ("kind", j["kind"]),
        ("last completed stage", j["stage"] or "—"),
        ("attempt", f"{j['attempt']} of {j['max_attempts']}"),
        ("deferrals", j["deferrals"]),
        ("priority", j["priority"]),
        ("run at", timestamp(j["run_at"])),
        ("correlation id", j["correlation_id"]),
        ("dedupe key", j["dedupe_key"] or "—"),
        ("lease owner", j["lease_owner"] or "—"),
        ("created", timestamp(j["created_at"])),
        ("updated", timestamp(j["updated_at"])),
        ("finished", timestamp(j["finished_at"])),
    ]
    dl = h("dl", [join([h("dt", k), h("dd", v, data_fact=k)]) for k, v in facts], class_="facts")
    events = h(
        "ol",
        [h("li", h("time", timestamp(at)), " ", what) for at, what in timeline(j)],
        class_="timeline",
    )
    errors = [
        h(
            "details",
            h(
                "summary",
                f"attempt {e.get('attempt', '?')} · stage {e.get('stage')} · {_error_line(e)}",
            ),
            h("pre", str(e.get("traceback") or "(no traceback)")),
            class_="error",
            open=i == len(j["errors"]) - 1,
        )
        for i, e in enumerate(j["errors"])
    ]
    return join(
        [
            h("div", actions, class_="actions") if any(actions) else None,
            dl,
            h("h2", "Timeline"),
            events,
            h("h2", "Payload"),
            h("pre", pretty_json(j["payload"]), class_="json", id="payload"),
            h("h2", "State"),
            h("pre", pretty_json(j["state"]), class_="json", id="state"),
            h("h2", f"Errors ({len(j['errors'])})"),
            errors or h("p", "None.", class_="empty"),
        ]
    )


# -- dead letters -----------------------------------------------------------------
def dead(view: View, rows: list[dict[str, Any]], queue: str | None, limit: int) -> Markup:
    actions = not view.read_only and view.csrf is not None
    back = url("/dead", queue=queue)
    head = (
        ["", "id", "queue", "kind", "stage", "attempt", "died", "error"]
        if actions
        else ["id", "queue", "kind", "stage", "attempt", "died", "error"]
    )
    body = []
    for r in rows:
        pick = (
            h(
                "td",
                h(
                    "input",
                    type="checkbox",
                    name="ids",
                    value=r["id"],
                    aria_label=f"select job {r['id']}",
                ),
            )
            if actions
            else None
        )
        body.append(
            h(
                "tr",
                pick,
                h("td", h("a", r["id"], href=f"/jobs/{r['id']}")),
                h("td", r["queue"]),
                h("td", r["kind"]),
                h("td", r["stage"] or "—"),
                h("td", f"{r['attempt']}/{r['max_attempts']}"),
                h("td", ago(r["finished_at"])),
                h("td", _error_line(r["last_error"]), class_="err"),
                data_job=r["id"],
            )
        )
    table = _table(head, body, "The dead-letter queue is empty.")
    more = None
    if len(rows) >= limit:
        more = h(
            "p",
            h("a", "Older →", href=url("/dead", queue=queue, before=rows[-1]["id"]), rel="next"),
        )
    if not actions or not rows:
        return join([table, more])
    bar = h(
        "div",
        h("label", h("input", type="checkbox", data_select_all="ids"), " all"),
        h(
            "button",
            "Requeue selected",
            type="submit",
            formaction="/api/jobs/requeue",
            id="requeue-selected",
        ),
        h(
            "button",
            "Cancel selected",
            type="submit",
            formaction="/api/jobs/cancel",
            class_="danger",
            id="cancel-selected",
        ),
        class_="actions",
    )
    return join(
        [
            h(
                "form",
                _csrf(view),
                h("input", type="hidden", name="next", value=back),
                bar,
                table,
                method="post",
                action="/api/jobs/requeue",
                id="dead-form",
            ),
            more,
        ]
    )


# -- queues, workers, breakers, schedules -----------------------------------------
def queues(view: View, data: dict[str, Any]) -> Markup:
    rows = []
    for q in data["queues"]:
        name, back = q["queue"], "/queues"
        toggle = (
            action(view, url(f"/api/queues/{_path(name)}/resume"), "Resume", back=back)
            if q["paused"]
            else action(
                view, url(f"/api/queues/{_path(name)}/pause"), "Pause", back=back, danger=True
            )
        )
        state = h(
            "span",
            "paused" if q["paused"] else "active",
            class_="badge" if q["paused"] else "muted",
            data_queue=name,
            data_field="state",
        )
        rows.append(
            h(
                "tr",
                h("th", h("a", name, href=url("/jobs", queue=name)), scope="row"),
                h("td", state),
                h("td", q["ready"], class_="num"),
                h("td", q["counts"]["running"], class_="num"),
                h("td", q["workers"], class_="num"),
                h("td", q["concurrency"], class_="num"),
                h("td", "—", class_="num"),
                h("td", toggle),
                data_row=name,
            )
        )
    head = ["queue", "state", "ready", "running", "live workers", "slots", "max running", ""]
    note = h(
        "p",
        "slots: job slots of the live workers serving the queue; max running "
        "(fleet-wide limit) comes with the job model.",
        class_="muted",
    )
    return join([_table(head, rows, "No queue has jobs yet."), note])


def _path(name: str) -> str:
    return quote(name, safe="")


def workers(view: View, rows: list[dict[str, Any]]) -> Markup:
    body = [
        h(
            "tr",
            h("td", w["id"]),
            h("td", _status("live" if w["alive"] else "gone")),
            h("td", w["host"]),
            h("td", w["pid"], class_="num"),
            h("td", w["version"]),
            h("td", ", ".join(w["queues"])),
            h("td", ", ".join(w["kinds"] or ["all"])),
            h("td", w["in_flight"], class_="num"),
            h("td", w["concurrency"], class_="num"),
            h("td", timestamp(w["started_at"])),
            h("td", ago(w["last_seen"])),
            data_worker=w["id"],
        )
        for w in rows
    ]
    head = [
        "id",
        "",
        "host",
        "pid",
        "version",
        "queues",
        "kinds",
        "in flight",
        "concurrency",
        "started",
        "last seen",
    ]
    return _table(head, body, "No worker has registered.")


def breakers(view: View, rows: list[dict[str, Any]]) -> Markup:
    body = [
        h(
            "tr",
            h("th", b["name"], scope="row"),
            h("td", _status(b["state"])),
            h("td", b["failures"], class_="num"),
            h("td", seconds(b["open_seconds"]) if b["open_seconds"] is not None else "—"),
            h("td", seconds(b["half_open_in"]) if b["state"] == "open" else "—"),
            h("td", b["trial_owner"] or "—"),
            h("td", ago(b["updated_at"])),
            h("td", b["updated_by"] or "—"),
            data_breaker=b["name"],
        )
        for b in rows
    ]
    head = ["breaker", "state", "failures", "open for", "half-open in", "trial by", "updated", "by"]
    return _table(head, body, "No fleet-wide breaker has been used yet.")


def schedules(view: View, rows: list[dict[str, Any]]) -> Markup:
    body = [
        h(
            "tr",
            h("th", s.get("name"), scope="row"),
            h("td", s.get("cron")),
            h("td", s.get("queue") or "—"),
            h("td", s.get("kind") or "default"),
            h("td", str(s.get("next_run") or "—")),
        )
        for s in rows
    ]
    return _table(["schedule", "cron", "queue", "kind", "next run"], body, "No schedules.")


def login(error: str | None, next_path: str) -> Markup:
    form = h(
        "form",
        h(
            "label",
            "Dashboard token ",
            h(
                "input",
                type="password",
                name="token",
                autocomplete="current-password",
                autofocus=True,
                required=True,
            ),
        ),
        h("input", type="hidden", name="next", value=next_path),
        h("button", "Log in", type="submit"),
        method="post",
        action="/login",
        class_="login",
    )
    body = join([h("p", error, class_="alert", role="alert") if error else None, form])
    view = View(schema="", csrf=None, read_only=False, logged_in=False, path="/login")
    return page(view, "Log in", body)


def message(view: View, title: str, text: str) -> Markup:
    return page(view, title, h("p", text))

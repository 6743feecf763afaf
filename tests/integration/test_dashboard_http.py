"""The dashboard over HTTP on a real PostgreSQL: pages and API, security rules
(token, session cookie, CSRF, Host, read-only, headers), input limits, escaping and
redaction, live events, actions. aiohttp's test client; the browser tests are in
tests/browser."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from worker_core import BaseWorker, JobStatus, PermanentError, Queue, StageContext
from worker_core.config import WorkerConfig
from worker_core.dashboard import create_app, serve

TOKEN = "test-dashboard-token-0123456789"
EVIL = "<script>alert('x')</script>"


class Fail:
    name = "fail"

    async def run(self, ctx: StageContext) -> None:
        if ctx.job.payload.get("bad"):
            raise PermanentError(f"bad {EVIL} password=hunter2-secret")


class Worker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Fail()]


Make = Callable[..., WorkerConfig]


@pytest.fixture
async def console(make_config: Make) -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient[Any, Any]] = []

    async def start(read_only: bool = False, **dashboard: Any) -> TestClient[Any, Any]:
        config = make_config(dashboard={"refresh_seconds": 0.2, **dashboard})
        async with Queue(config) as queue:
            await queue.migrate()
        client: TestClient[Any, Any] = TestClient(
            TestServer(create_app(config, read_only=read_only), host="127.0.0.1")
        )
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def filled(config: WorkerConfig) -> dict[str, int]:
    async with Queue(config) as queue:
        await queue.migrate()
        bad = await queue.enqueue({"bad": True, "html": EVIL, "api_key": "sk-live-123456"})
        ok = await queue.enqueue({"ok": 1})
        later = await queue.enqueue({"later": 1}, run_at=600)
        await Worker(config).run(until_empty=True, install_signal_handlers=False)
    return {"dead": bad, "ok": ok, "later": later}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


async def test_every_page_renders_with_strict_headers(console: Any, filled: dict[str, int]) -> None:
    client = await console()
    for path in ("/", "/jobs", f"/jobs/{filled['dead']}", "/dead", "/queues", "/workers",
                 "/breakers", "/schedules", "/?range=day", "/charts/throughput.svg",
                 "/charts/failures.svg?range=day", "/static/console.js", "/static/console.css",
                 "/api/overview", "/api/jobs", f"/api/jobs/{filled['ok']}", "/api/queues",
                 "/api/workers", "/api/breakers", "/api/history", "/api/schedules"):  # fmt: skip
        response = await client.get(path)
        assert response.status == 200, (path, await response.text())
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    not_found = await client.get("/nope")
    assert not_found.status == 404 and "Content-Security-Policy" in not_found.headers


async def test_pages_work_offline_no_external_url(console: Any, filled: dict[str, int]) -> None:
    client = await console()
    for path in ("/", "/jobs", "/dead", "/static/console.js", "/static/console.css"):
        text = await (await client.get(path)).text()
        urls = re.findall(r"(?:src|href)=\"([^\"]+)\"", text) + re.findall(r"https?://\S+", text)
        assert all(u.startswith("/") or "w3.org/2000/svg" in u for u in urls), urls


async def test_overview_counts_carry_queue_and_status(console: Any, filled: dict[str, int]) -> None:
    client = await console()
    html = await (await client.get("/")).text()
    found = re.findall(
        r'<td data-queue="([^"]+)" data-status="([a-z]+)" class="num">(\d+)</td>', html
    )
    cells = {(q, status): int(n) for q, status, n in found}
    assert len(cells) == 10  # five statuses of the queue, five of all queues
    assert cells[("test", "succeeded")] == 1
    assert cells[("test", "dead")] == 1
    assert cells[("test", "queued")] == 1
    assert cells[("*", "dead")] == 1
    data = await (await client.get("/api/overview")).json()
    (queue,) = data["queues"]
    assert queue["counts"] == {"queued": 1, "running": 0, "succeeded": 1, "dead": 1,
                               "cancelled": 0}  # fmt: skip
    assert (queue["ready"], queue["scheduled"]) == (0, 1)
    assert queue["succeeded_1h"] == 1 and queue["failed_1h"] == 1


async def test_payloads_are_escaped_and_secrets_redacted(
    console: Any, filled: dict[str, int]
) -> None:
    client = await console()
    for path in (f"/jobs/{filled['dead']}", "/dead", "/jobs"):
        html = await (await client.get(path)).text()
        assert EVIL not in html and "alert(&#x27;x&#x27;)" in html
        assert "sk-live-123456" not in html and "hunter2-secret" not in html
    page = await (await client.get(f"/jobs/{filled['dead']}")).text()
    assert "Traceback" in page and "PermanentError" in page
    data = await (await client.get(f"/api/jobs/{filled['dead']}")).json()
    assert data["payload"]["api_key"] == "***"
    assert "hunter2-secret" not in json.dumps(data)


@pytest.mark.parametrize(
    "path",
    [
        "/jobs?limit=nan", "/jobs?limit=inf", "/jobs?limit=-5", "/jobs?limit=1e2",
        "/jobs?limit=999999999999999999999", "/jobs?before=0", "/jobs?q=%00",
        "/jobs?q=%ED%A0%80", "/jobs?q=%FF", "/jobs?queue=" + "x" * 300,
        "/jobs?status=exploded", "/jobs?limit=1&limit=2", "/jobs?unknown=1",
        "/jobs/abc", "/jobs/0", "/jobs/99999999999999999999", "/api/history?minutes=nan",
        "/api/history?minutes=100000000", "/?range=week", "/charts/throughput.svg?t=-1",
    ],
)  # fmt: skip
async def test_bad_inputs_are_400_with_a_message(
    console: Any, filled: dict[str, int], path: str
) -> None:
    client = await console()
    response = await client.get(path)
    assert response.status == 400, await response.text()
    text = await response.text()
    assert any(
        w in text for w in ("must", "not valid", "unknown", "more than once", "longer", "contains")
    )


async def test_token_required_for_everything_but_login(
    console: Any, filled: dict[str, int]
) -> None:
    client = await console(token=TOKEN)
    for path in ("/", "/jobs", "/api/overview", "/api/events", "/charts/throughput.svg"):
        response = await client.get(path)
        assert response.status == 401, path
    api = await client.get("/api/jobs")
    assert api.headers["WWW-Authenticate"].startswith("Bearer")
    page = await client.get("/")
    assert 'name="token"' in await page.text()  # the login form
    assert (
        await client.get("/api/overview", headers={"Authorization": "Bearer nope"})
    ).status == 401
    ok = await client.get("/api/overview", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200
    assert (await client.get("/static/console.css")).status == 200


async def test_login_sets_a_strict_session_cookie(console: Any, filled: dict[str, int]) -> None:
    client = await console(token=TOKEN)
    wrong = await client.post("/login", data={"token": "wrong"}, allow_redirects=False)
    assert wrong.status == 401
    response = await client.post("/login", data={"token": TOKEN, "next": "/dead"},
                                 allow_redirects=False)  # fmt: skip
    assert response.status == 303 and response.headers["Location"] == "/dead"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert (await client.get("/dead")).status == 200
    # next= never leaves the dashboard.
    evil = await client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"},
                             allow_redirects=False)  # fmt: skip
    assert evil.headers["Location"] == "/"


async def test_failed_logins_are_limited(console: Any) -> None:
    client = await console(token=TOKEN)
    for _ in range(5):
        assert (await client.post("/login", data={"token": "x"})).status == 401
    blocked = await client.post("/login", data={"token": TOKEN})
    assert blocked.status == 429


async def test_actions_need_csrf_and_same_origin(
    console: Any, filled: dict[str, int], config: WorkerConfig
) -> None:
    client = await console(token=TOKEN)
    await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
    html = await (await client.get("/dead")).text()
    csrf = csrf_of(html)
    path = f"/api/jobs/{filled['dead']}/requeue"
    assert (await client.post(path, data={})).status == 403
    assert (await client.post(path, data={"csrf": "forged"})).status == 403
    cross = await client.post(path, data={"csrf": csrf}, headers={"Origin": "http://evil.example"})
    assert cross.status == 403 and "cross-site" in await cross.text()
    site = await client.post(path, data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"})
    assert site.status == 403
    async with Queue(config) as queue:
        assert (await queue.get(filled["dead"])).status is JobStatus.DEAD  # type: ignore[union-attr]
    done = await client.post(path, data={"csrf": csrf, "next": "/dead"}, allow_redirects=False)
    assert done.status == 303 and done.headers["Location"] == "/dead?notice=requeued"
    async with Queue(config) as queue:
        assert (await queue.get(filled["dead"])).status is JobStatus.QUEUED  # type: ignore[union-attr]


async def test_bearer_api_actions_skip_csrf(
    console: Any, filled: dict[str, int], config: WorkerConfig
) -> None:
    client = await console(token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    paused = await client.post("/api/queues/test/pause", headers=auth)
    assert await paused.json() == {"queue": "test", "paused": True, "changed": True}
    bulk = await client.post("/api/jobs/cancel", json={"ids": [filled["later"], filled["dead"]]},
                             headers=auth)  # fmt: skip
    assert await bulk.json() == {"cancelled": 2, "of": 2}
    bad = await client.post("/api/jobs/requeue", json={"ids": [True]}, headers=auth)
    assert bad.status == 400
    huge = await client.post("/api/jobs/requeue", json={"ids": list(range(1, 2000))}, headers=auth)
    assert huge.status in (400, 413)
    junk = await client.post("/api/jobs/requeue", data=b"{not json",
                             headers={**auth, "Content-Type": "application/json"})  # fmt: skip
    assert junk.status == 400
    async with Queue(config) as queue:
        assert await queue.paused() == ["test"]
        assert (await queue.get(filled["dead"])).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    resumed = await client.post("/api/queues/test/resume", headers=auth)
    assert (await resumed.json())["changed"] is True


async def test_without_a_token_only_loopback_hosts_are_served(
    console: Any, filled: dict[str, int]
) -> None:
    client = await console()
    assert (await client.get("/", headers={"Host": "evil.example"})).status == 403
    assert (await client.get("/", headers={"Host": "localhost:8787"})).status == 200
    # The browser still needs the session's CSRF token for actions.
    html = await (await client.get("/dead")).text()
    path = f"/api/jobs/{filled['dead']}/cancel"
    assert (await client.post(path, data={})).status == 403
    ok = await client.post(path, data={"csrf": csrf_of(html)}, allow_redirects=False)
    assert ok.status == 303


async def test_read_only_has_no_action_at_all(console: Any, filled: dict[str, int]) -> None:
    client = await console(read_only=True, token=TOKEN)
    await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
    for path in ("/", "/dead", "/queues", f"/jobs/{filled['dead']}", "/jobs"):
        html = await (await client.get(path)).text()
        assert "/api/" not in html and 'type="checkbox"' not in html, path
        assert "csrf" not in html and 'method="post"' not in html, path
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in (f"/api/jobs/{filled['dead']}/requeue", "/api/queues/test/pause"):
        response = await client.post(path, headers=auth)
        assert response.status == 403 and "read-only" in await response.text()


async def test_serve_refuses_a_public_address_without_token(make_config: Make) -> None:
    config = make_config()
    with pytest.raises(PermissionError, match=r"dashboard\.token"):
        await serve(config, host="0.0.0.0", port=0)


async def test_live_events_carry_the_overview(console: Any, filled: dict[str, int]) -> None:
    client = await console()
    response = await client.get("/api/events")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    event = b""
    async with asyncio.timeout(10):
        while b"\n\n" not in event.split(b"event: overview", 1)[-1] or b"event:" not in event:
            event += await response.content.readany()
    data = event.split(b"event: overview\ndata: ", 1)[1].split(b"\n\n", 1)[0]
    overview = json.loads(data)
    assert overview["queues"][0]["counts"]["dead"] == 1
    response.close()


async def test_queue_names_with_slashes_can_be_paused(console: Any, config: WorkerConfig) -> None:
    client = await console(token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/api/queues/a%2Fb%20c/pause", headers=auth)
    assert (await response.json())["queue"] == "a/b c"
    async with Queue(config) as queue:
        assert await queue.paused() == ["a/b c"]


async def test_schedules_come_from_a_pluggable_source(make_config: Make) -> None:
    config = make_config()
    async with Queue(config) as queue:
        await queue.migrate()

    async def source() -> list[dict[str, Any]]:
        return [{"name": EVIL, "cron": "*/5 * * * *", "next_run": "2030-01-01T00:00:00+00:00",
                 "queue": "test", "kind": "report", "token": "never-shown-123"}]  # fmt: skip

    for schedules, expected in ((None, "No schedules."), (source, "*/5 * * * *")):
        app = create_app(config, schedules=schedules)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            html = await (await client.get("/schedules")).text()
            assert expected in html and EVIL not in html
            data = await (await client.get("/api/schedules")).json()
            assert "never-shown-123" not in json.dumps(data)

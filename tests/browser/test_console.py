"""The operations console in a real browser (headless Chromium): live counts, a dead
letter requeued from the page, pausing a queue, the token and cross-site POSTs,
read-only mode."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from worker_core import JobStatus

from .conftest import Served, counts_in_db, counts_on_page

TOKEN = "browser-test-token-0123456789"


def wait(driver: Any, timeout: float = 20) -> WebDriverWait[Any]:
    # An element found just before the page navigated (a POST's redirect) or the live
    # refresh replaced it goes stale: look again at the next poll.
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )


def status_of(served: Served, job_id: int) -> JobStatus:
    job = served.run(served.queue.get(job_id))
    assert job is not None
    return job.status


def test_overview_counts_match_the_database_and_update_live(page: Any, serve: Any) -> None:
    served: Served = serve()
    q = served.queue
    served.broken.add("doomed")
    served.run(q.enqueue_many([{"key": f"k{i}"} for i in range(6)]))
    served.run(q.enqueue({"key": "doomed"}))
    served.run(q.enqueue({"key": "later"}, queue="mail", run_at=3600))
    page.get(served.url("/"))
    wait(page).until(lambda d: d.find_element(By.ID, "live-state").text == "live")
    assert counts_on_page(page) == served.run(counts_in_db(q))
    assert counts_on_page(page)[("test", "queued")] == 7
    # Mark this document: a reload would lose the mark.
    page.execute_script("window.__no_reload = 42;")
    served.drain()
    expected = served.run(counts_in_db(q))
    assert expected[("test", "succeeded")] == 6 and expected[("test", "dead")] == 1
    wait(page).until(lambda d: counts_on_page(d) == expected)
    assert page.execute_script("return window.__no_reload;") == 42
    # A queue that appears later gets its row without a reload too.
    served.run(q.enqueue({"key": "x"}, queue="zeta"))
    wait(page).until(lambda d: counts_on_page(d).get(("zeta", "queued")) == 1)
    assert page.execute_script("return window.__no_reload;") == 42


def test_a_dead_letter_requeued_from_the_page_runs_and_succeeds(page: Any, serve: Any) -> None:
    served: Served = serve()
    served.broken.add("poison")
    dead = served.run(served.queue.enqueue({"key": "poison"}))
    other = served.run(served.queue.enqueue({"key": "poison", "n": 2}))
    served.drain()
    assert status_of(served, dead) is JobStatus.DEAD
    served.broken.clear()  # the bug was fixed: the job can run now
    page.get(served.url("/dead"))
    page.find_element(By.CSS_SELECTOR, f'input[name="ids"][value="{dead}"]').click()
    page.find_element(By.ID, "requeue-selected").click()
    wait(page).until(lambda d: "Requeued." in d.find_element(By.TAG_NAME, "main").text)
    assert status_of(served, dead) is JobStatus.QUEUED
    assert status_of(served, other) is JobStatus.DEAD  # not selected, not touched
    served.drain()
    assert status_of(served, dead) is JobStatus.SUCCEEDED
    page.get(served.url(f"/jobs/{dead}"))
    status = page.find_element(By.CSS_SELECTOR, '[data-fact="status"]').text
    assert status == "succeeded"


def test_a_paused_queue_shows_paused_and_runs_nothing(page: Any, serve: Any) -> None:
    served: Served = serve()
    ids = served.run(served.queue.enqueue_many([{"key": f"p{i}"} for i in range(3)]))
    page.get(served.url("/"))
    badge = page.find_element(By.CSS_SELECTOR, '[data-queue="test"][data-field="paused"]')
    assert not badge.is_displayed()
    page.get(served.url("/queues"))
    row = page.find_element(By.CSS_SELECTOR, 'tr[data-row="test"]')
    row.find_element(By.XPATH, ".//button[text()='Pause']").click()
    wait(page).until(lambda d: "Paused:" in d.find_element(By.TAG_NAME, "main").text)
    state = page.find_element(By.CSS_SELECTOR, '[data-queue="test"][data-field="state"]')
    assert state.text == "paused"
    assert served.run(served.queue.paused()) == ["test"]
    worker = served.drain()  # returns at once: nothing is ready on a paused queue
    assert worker.metrics.processed == 0
    assert {status_of(served, i) for i in ids} == {JobStatus.QUEUED}
    page.get(served.url("/"))
    badge = page.find_element(By.CSS_SELECTOR, '[data-queue="test"][data-field="paused"]')
    assert badge.is_displayed()
    page.get(served.url("/queues"))
    page.find_element(By.XPATH, "//tr[@data-row='test']//button[text()='Resume']").click()
    wait(page).until(lambda d: "Resumed." in d.find_element(By.TAG_NAME, "main").text)
    served.drain()
    assert {status_of(served, i) for i in ids} == {JobStatus.SUCCEEDED}


def test_with_a_token_anonymous_gets_401_and_cross_site_posts_are_refused(
    page: Any, serve: Any
) -> None:
    served: Served = serve(token=TOKEN)
    job_id = served.run(served.queue.enqueue({"key": "keep"}))
    page.get(served.url("/"))
    assert page.find_element(By.NAME, "token")  # the login form, served with 401
    status = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/overview').then(r => done(r.status));"
    )
    assert status == 401
    page.find_element(By.NAME, "token").send_keys(TOKEN)
    page.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait(page).until(lambda d: d.find_elements(By.ID, "overview-rows"))
    cookie = page.get_cookie("wc_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.execute_script("return document.cookie;") == ""  # HttpOnly: no script reads it

    # Another site (a different host name, so a different site) posts a form at the
    # dashboard while the operator is logged in.
    async def attacker() -> tuple[web.AppRunner, int]:
        form = (f'<form id="f" method="post" action="{served.url(f"/api/jobs/{job_id}/cancel")}">'
                '<input name="next" value="/"></form>'
                "<script>document.getElementById('f').submit()</script>")  # fmt: skip

        async def index(request: web.Request) -> web.Response:
            return web.Response(text=form, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", index)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, int(runner.addresses[0][1])

    runner, port = served.run(attacker())
    served.cleanups.append(runner.cleanup)
    # Cross-site (localhost is another site than 127.0.0.1): the SameSite=Strict cookie
    # stays home, so the dashboard sees an anonymous request.
    page.get(f"http://localhost:{port}/")
    wait(page).until(lambda d: d.current_url.startswith(served.base))
    assert "authentication required" in page.find_element(By.TAG_NAME, "body").text
    assert status_of(served, job_id) is JobStatus.QUEUED
    # Same site, other origin (another port of 127.0.0.1): the cookie is sent, and the
    # origin check (and the missing CSRF token) refuse the request.
    page.get(f"http://127.0.0.1:{port}/")
    wait(page).until(lambda d: d.current_url.startswith(served.base))
    assert "cross-site request refused" in page.find_element(By.TAG_NAME, "body").text
    assert status_of(served, job_id) is JobStatus.QUEUED


def test_read_only_mode_shows_no_action(page: Any, serve: Any) -> None:
    served: Served = serve(read_only=True)
    served.broken.add("bad")
    dead = served.run(served.queue.enqueue({"key": "bad"}))
    served.run(served.queue.enqueue({"key": "waiting"}, run_at=3600))
    served.drain()
    for path in ("/", "/dead", "/queues", f"/jobs/{dead}", "/jobs", "/workers", "/breakers"):
        page.get(served.url(path))
        assert page.find_elements(By.CSS_SELECTOR, "form[method=post]") == [], path
        assert page.find_elements(By.CSS_SELECTOR, "input[type=checkbox]") == [], path
        buttons = [b.text for b in page.find_elements(By.TAG_NAME, "button")]
        assert set(buttons) <= {"Filter"}, (path, buttons)  # the jobs page's GET filter
    assert "read-only" in page.find_element(By.TAG_NAME, "header").text
    status = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/api/jobs/{dead}/requeue', {{method: 'POST'}}).then(r => done(r.status));"
    )
    assert status == 403
    assert status_of(served, dead) is JobStatus.DEAD

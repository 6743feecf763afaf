"""The dashboard's pure parts: escaping, input checks, sessions and CSRF, the shared
cache, SVG charts. No server, no database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core.dashboard._charts import bars
from worker_core.dashboard._data import Cached
from worker_core.dashboard._html import Markup, esc, h, url
from worker_core.dashboard._params import (
    BadRequest,
    Params,
    check_utf8,
    job_id,
    parse_form,
    parse_ids,
    parse_json,
)
from worker_core.dashboard._security import (
    LoginLimiter,
    Security,
    host_name,
    is_loopback_host,
)

EVIL = '<script>alert("x")</script>&\'"'


def test_text_and_attributes_are_escaped() -> None:
    out = h("td", EVIL, title=EVIL, data_queue=EVIL)
    assert "<script>" not in out
    assert out.count("&lt;script&gt;") == 3
    assert 'data-queue="&lt;script&gt;' in out
    assert h("p", Markup("<b>ok</b>")) == "<p><b>ok</b></p>"
    assert h("input", disabled=True, hidden=False, value=None) == "<input disabled>"
    assert esc("\ud800") == "?"  # a lone surrogate cannot reach the UTF-8 response


class Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text += data


@given(st.text(st.characters(blacklist_categories=["Cs"])))
def test_any_text_stays_text(text: str) -> None:
    parser = Parsed()
    parser.feed(h("div", text, title=text))
    parser.close()
    assert parser.tags == [("div", [("title", text)])]
    assert parser.text == text


def test_url_encodes_query_values() -> None:
    assert url("/jobs", queue="a&b=c", before=None, q="") == "/jobs?queue=a%26b%3Dc"


BAD_QUERIES = [
    ({"limit": "nan"}, "whole number"),
    ({"limit": "inf"}, "whole number"),
    ({"limit": "1e3"}, "whole number"),
    ({"limit": "-1"}, "whole number"),
    ({"limit": "99999999999999999999999"}, "whole number"),
    ({"limit": "0"}, "from 1 to 500"),
    ({"queue": "a\x00b"}, "NUL"),
    ({"queue": "a\x07b"}, "control character"),
    ({"queue": "x" * 201}, "longer than 200"),
    ({"queue": "replacement \ufffd"}, "not valid UTF-8"),
    ({"queue": "surrogate \udc80"}, "not valid UTF-8"),
    ({"status": "exploded"}, "must be one of"),
    ({"sneaky": "1"}, "unknown parameter"),
]


def _read_all(query: dict[str, str]) -> None:
    params = Params(query, {"limit", "queue", "status"})
    params.integer("limit", lo=1, hi=500)
    params.text("queue")
    params.choice("status", ("queued", "dead"))


@pytest.mark.parametrize(("query", "fragment"), BAD_QUERIES)
def test_bad_query_values_are_refused_with_a_clear_message(
    query: dict[str, str], fragment: str
) -> None:
    with pytest.raises(BadRequest, match=fragment):
        _read_all(query)


def test_repeated_parameters_are_refused() -> None:
    from multidict import MultiDict

    with pytest.raises(BadRequest, match="more than once"):
        Params(MultiDict([("limit", "1"), ("limit", "2")]), {"limit"})


def test_raw_query_must_be_utf8() -> None:
    check_utf8("q=%F0%9F%98%80", "query string")
    for raw in ("q=%ED%A0%80", "q=%FF", "q=%C3"):
        with pytest.raises(BadRequest, match="not valid UTF-8"):
            check_utf8(raw, "query string")


def test_job_ids_and_id_lists() -> None:
    assert job_id("42") == 42
    for bad in ("0", "-1", "1.5", "nan", "9223372036854775808", "12abc", ""):
        with pytest.raises(BadRequest):
            job_id(bad)
    assert parse_ids(["3", "1", "3"]) == [1, 3]
    assert parse_ids([5, 2]) == [2, 5]
    for bad_ids in ([], [True], [1.5], ["x"], list(range(1, 1003)), "1,2", None):
        with pytest.raises(BadRequest):
            parse_ids(bad_ids)


def test_forms_and_json_bodies_are_strict() -> None:
    assert parse_form(b"ids=1&ids=2&csrf=abc") == {"ids": ["1", "2"], "csrf": ["abc"]}
    for body in (b"ids=%FF", b"ids=%ED%A0%80", "ids=é".encode(), b"ids=%00"):
        with pytest.raises(BadRequest):
            parse_form(body)
    assert parse_json(b'{"ids": [1]}') == {"ids": [1]}
    for body in (b"{", b"[1]", b'{"a": NaN}', b'{"a": Infinity}', b"\xff"):
        with pytest.raises(BadRequest):
            parse_json(body)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_are_signed_and_expire() -> None:
    clock = Clock()
    security = Security("a-long-enough-token-123", session_seconds=60, clock=clock)
    session, cookie = security.new_session()
    assert security.session(cookie) == session
    sid, expires, signature = cookie.split(".")
    assert security.session(f"{sid}.{int(expires) + 3600}.{signature}") is None  # extended
    assert security.session(f"x{sid}.{expires}.{signature}") is None
    assert security.session("garbage") is None
    assert security.session("a" * 500) is None
    # Sessions survive a restart (same token) and die with a new token.
    again = Security("a-long-enough-token-123", session_seconds=60, clock=clock)
    assert again.session(cookie) == session
    assert Security("another-token-12345678", session_seconds=60).session(cookie) is None
    clock.now += 61
    assert security.session(cookie) is None


def test_csrf_and_token_checks() -> None:
    security = Security("a-long-enough-token-123", session_seconds=60)
    session, _ = security.new_session()
    other, _ = security.new_session()
    assert security.csrf_ok(session, session.csrf)
    assert not security.csrf_ok(session, other.csrf)
    assert not security.csrf_ok(session, None)
    assert security.token_ok("a-long-enough-token-123")
    assert not security.token_ok("a-long-enough-token-12")
    assert security.bearer_ok("Bearer a-long-enough-token-123")
    assert not security.bearer_ok("Basic a-long-enough-token-123")
    assert "token-123" not in repr(security)
    assert not Security(None, session_seconds=60).token_ok("")


def test_login_limiter_blocks_then_forgets() -> None:
    clock = Clock()
    limiter = LoginLimiter(attempts=3, window=60, max_clients=2, clock=clock)
    for _ in range(3):
        assert limiter.blocked_for("a") == 0
        limiter.failed("a")
    assert limiter.blocked_for("a") == pytest.approx(60)
    assert limiter.blocked_for("b") == 0
    clock.now += 61
    assert limiter.blocked_for("a") == 0
    for client in ("c", "d", "e"):
        limiter.failed(client)
    assert len(limiter._failures) == 2


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
     ("evil.example", False), ("localhost.evil.example", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_host_header_parsing() -> None:
    assert host_name("127.0.0.1:8787") == "127.0.0.1"
    assert host_name("[::1]:8787") == "::1"
    assert host_name("localhost") == "localhost"


async def test_cache_loads_once_for_concurrent_readers_and_backs_off_when_slow() -> None:
    clock = Clock()
    calls = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        clock.now += 0.5  # the load "took" 0.5 s
        return calls

    cache = Cached(load, min_interval=1.0, cost_factor=20.0, clock=clock)
    readers = [asyncio.create_task(cache.get()) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*readers) == [1] * 20
    assert calls == 1
    clock.now += 5  # past min_interval, but within 20 x 0.5 s
    assert await cache.get() == 1
    clock.now += 6
    assert await cache.get() == 2
    cache.invalidate()
    assert await cache.get() == 3


async def test_cache_failure_reaches_waiters_and_the_next_get_retries() -> None:
    attempts = 0

    async def load() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("down")
        return 7

    cache = Cached(load, min_interval=1.0)
    with pytest.raises(ConnectionError):
        await cache.get()
    assert await cache.get() == 7


def test_chart_is_svg_with_escaped_labels() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    xs = [now + timedelta(minutes=i) for i in range(60)]
    svg = bars("jobs <per> minute", xs, [("ok<script>", "#0a0", [float(i) for i in range(60)])])
    assert svg.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in svg
    assert "<script>" not in svg and "ok&lt;script&gt;" in svg
    assert svg.count("<rect") == 59 + 1  # one bar per non-zero minute, one legend box
    empty = bars("nothing", xs, [("ok", "#0a0", [0.0] * 60)])
    assert "<rect" in empty  # the legend only

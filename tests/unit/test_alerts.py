"""Alert states (pure, on a fake clock), announcements and webhook retries."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core.alerts import AlertState, Notification, WebhookSender, describe, step


def run(
    values: Sequence[float], *, threshold: float = 0.0, for_seconds: float = 0.0,
    resolve_after: float = 0.0, every: float = 10.0,
) -> list[str]:  # fmt: skip
    """Evaluate ``values`` one per tick; return the announcements made, in order."""
    state: AlertState | None = None
    announced: list[str] = []
    for i, value in enumerate(values):
        state = step(state, alert="dead_letters", subject="q", value=value, threshold=threshold,
                     now=i * every, for_seconds=for_seconds, resolve_after=resolve_after)  # fmt: skip
        if state is not None and state.owed is not None:
            announced.append(state.owed)
            state = AlertState(**{**_fields(state), "notified": state.owed})
    return announced


def _fields(state: AlertState) -> dict[str, Any]:
    return {f: getattr(state, f) for f in AlertState.__slots__}


def test_fires_once_and_resolves_once() -> None:
    assert run([0, 3, 5, 7, 0, 0]) == ["firing", "resolved"]


def test_never_true_needs_no_state() -> None:
    assert step(None, alert="a", subject="q", value=0, threshold=0, now=0) is None


def test_for_seconds_waits_before_firing() -> None:
    assert run([1, 1, 1], for_seconds=25) == []
    assert run([1, 1, 1, 1], for_seconds=25) == ["firing"]
    assert run([1, 0, 1, 0, 1], for_seconds=15) == []  # never true long enough


def test_hold_time_prevents_a_flapping_storm() -> None:
    flapping = [1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert run(flapping, resolve_after=0) == ["firing", "resolved"] * 4
    assert run(flapping, resolve_after=35) == ["firing", "resolved"]


@given(st.lists(st.sampled_from([0.0, 1.0]), max_size=60), st.sampled_from([0.0, 20.0, 50.0]))
def test_announcements_alternate_starting_with_firing(values: list[float], hold: float) -> None:
    announced = run(values, resolve_after=hold)
    assert announced == ["firing", "resolved"] * (len(announced) // 2) + (
        ["firing"] if len(announced) % 2 else []
    )


def test_text_is_slack_compatible_and_names_the_subject() -> None:
    state = AlertState("dead_letters", "docs", "firing", 0.0, 3.0, 0.0)
    text = describe(state, "firing", 300.0)
    assert text.startswith("[FIRING] dead_letters:") and "'docs'" in text and "300" in text
    note = Notification("breaker_open_seconds", "resolved", "embed", 0.0, 60.0, "t")
    assert note.body() == {"alert": "breaker_open_seconds", "status": "resolved",
                           "queue": "embed", "value": 0.0, "threshold": 60.0, "text": "t",
                           "breaker": "embed"}  # fmt: skip


class Script:
    """A fake webhook: answers the statuses (or raises the exceptions) in order."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, body: dict[str, Any]) -> int:
        self.bodies.append(body)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "hang":
            await asyncio.Event().wait()
        return int(answer)


async def test_webhook_retries_server_errors_then_delivers() -> None:
    post = Script(500, ConnectionError("refused"), 200)
    sender = WebhookSender("http://127.0.0.1:1/hook", retries=3, delay=0, post=post)
    assert await sender.send({"alert": "a"}) is True
    assert len(post.bodies) == 3


async def test_webhook_gives_up_for_now_after_its_retries() -> None:
    post = Script(503, 503, "hang")
    sender = WebhookSender("http://127.0.0.1:1/hook", retries=2, delay=0, timeout=0.05, post=post)
    assert await sender.send({"alert": "a"}) is None


async def test_webhook_client_errors_are_final() -> None:
    post = Script(404)
    sender = WebhookSender("http://127.0.0.1:1/hook", retries=3, delay=0, post=post)
    assert await sender.send({"alert": "a"}) is False
    assert len(post.bodies) == 1


def test_webhook_url_never_in_repr() -> None:
    sender = WebhookSender("https://hooks.example/services/T000/B000/SECRETSECRET")
    assert "SECRET" not in repr(sender)


@pytest.mark.parametrize("status", [408, 429])
async def test_webhook_retries_timeouts_and_rate_limits(status: int) -> None:
    post = Script(status, 204)
    sender = WebhookSender("http://127.0.0.1:1/hook", retries=1, delay=0, post=post)
    assert await sender.send({"alert": "a"}) is True

"""Alerting: rules evaluated by one worker of the fleet at a time.

Each evaluation the worker holding the ``alerts`` lease (a row in
``{schema}.leases``, taken and renewed by one guarded upsert) reads every rule's
values per subject (a queue, or a breaker for ``breaker_open_seconds``), moves
each alert through ``step`` and stores the states (only while it still holds the
lease). Announcements follow the stored state, not the evaluation: an alert is
announced ``firing`` once and ``resolved`` once, as a structured log line and a
webhook POST, and a webhook that fails is retried at the next evaluation until it
is delivered. ``resolve_after`` (hold time) keeps a flapping condition from
sending a storm: a firing alert resolves only once its condition stayed clear
that long. ``worker_core_alert_firing{alert,queue}`` is exported by every worker's
metrics from the stored states.

Statuses: ``ok`` (clear), ``pending`` (true, not yet for ``for_seconds``),
``firing``, ``resolving`` (firing, clear for less than ``resolve_after``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .logs import StructuredLogger
from .redact import redact_text

if TYPE_CHECKING:
    from .config import AlertSettings
    from .queue import Queue

__all__ = ["LEASE", "AlertEvaluator", "AlertState", "Notification", "WebhookSender", "step"]

LEASE = "alerts"
_FIRING = frozenset({"firing", "resolving"})

_DESCRIBE = {
    "dead_letters": "{value:g} job(s) went dead in the last {window:g} s on queue {subject!r}",
    "oldest_ready_seconds": "the oldest ready job of queue {subject!r} has waited {value:.0f} s",
    "breaker_open_seconds": "circuit breaker {subject!r} has been open for {value:.0f} s",
    "no_workers_seconds": "queue {subject!r} has had ready jobs and no live worker for "
    "{value:.0f} s",
    "failure_ratio": "{value:.1%} of the attempts on queue {subject!r} failed in the last "
    "{window:g} s",
}


@dataclass(frozen=True, slots=True)
class AlertState:
    """One alert of one subject, as stored in ``{schema}.alerts``."""

    alert: str
    subject: str
    status: str
    #: When the current status began (epoch seconds, database clock).
    since: float
    value: float
    threshold: float
    #: The last status announced: firing or resolved.
    notified: str = "resolved"

    @property
    def firing(self) -> bool:
        return self.status in _FIRING

    @property
    def owed(self) -> str | None:
        """The announcement still to make (firing or resolved), if any."""
        if self.firing and self.notified != "firing":
            return "firing"
        if not self.firing and self.notified == "firing":
            return "resolved"
        return None

    def row(self) -> list[Any]:
        return [
            self.alert,
            self.subject,
            self.status,
            self.since,
            self.value,
            self.threshold,
            self.notified,
        ]


def step(
    prev: AlertState | None,
    *,
    alert: str,
    subject: str,
    value: float,
    threshold: float,
    now: float,
    for_seconds: float = 0.0,
    resolve_after: float = 0.0,
) -> AlertState | None:
    """The next state of an alert whose condition is ``value > threshold`` now.

    Pure: the clock is ``now``. None means "no state needed" (never fired, clear).
    """
    active = value > threshold
    base = prev or AlertState(alert, subject, "ok", now, value, threshold)
    base = replace(base, value=value, threshold=threshold)
    status = base.status
    if status in ("ok", "pending"):
        if not active:
            return (
                None
                if prev is None
                else replace(base, status="ok", since=(base.since if status == "ok" else now))
            )
        since = base.since if status == "pending" else now
        if now - since >= for_seconds:
            return replace(base, status="firing", since=now)
        return replace(base, status="pending", since=since)
    if active:  # firing, or resolving and true again: the same incident goes on
        return replace(base, status="firing", since=base.since if status == "firing" else now)
    since = base.since if status == "resolving" else now
    if now - since >= resolve_after:
        return replace(base, status="ok", since=now)
    return replace(base, status="resolving", since=since)


@dataclass(frozen=True, slots=True)
class Notification:
    """One announcement: the webhook body, also the fields of the log line."""

    alert: str
    status: str  # firing or resolved
    queue: str
    value: float
    threshold: float
    text: str

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "alert": self.alert,
            "status": self.status,
            "queue": self.queue,
            "value": self.value,
            "threshold": self.threshold,
            "text": self.text,
        }
        if self.alert == "breaker_open_seconds":
            data["breaker"] = self.queue
        return data


def describe(state: AlertState, status: str, window: float) -> str:
    """The Slack-compatible ``text`` of an announcement."""
    template = _DESCRIBE.get(state.alert, "{alert} on {subject!r}: {value:g}")
    what = template.format(
        alert=state.alert, subject=state.subject, value=state.value, window=window
    )
    mark = "FIRING" if status == "firing" else "RESOLVED"
    return f"[{mark}] {state.alert}: {what} (threshold {state.threshold:g})"


Post = Callable[[dict[str, Any]], Awaitable[int]]


class WebhookSender:
    """POST JSON to the alert webhook with a timeout and retries.

    ``post`` (tests) replaces the HTTP call: it takes the body and returns a status.
    Retries 5xx, 408, 429, timeouts and connection errors with a doubling delay;
    other 4xx answers are final (retrying cannot fix the request).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        delay: float = 0.5,
        secrets: Iterable[str] = (),
        post: Post | None = None,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._retries = retries
        self._delay = delay
        self._secrets = [url, *secrets]
        self._post = post or self._http_post
        self._log = StructuredLogger("worker_core.alerts")

    def __repr__(self) -> str:
        return "WebhookSender(url='***')"

    async def _http_post(self, body: dict[str, Any]) -> int:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self._url, json=body, allow_redirects=False) as response,
        ):
            await response.read()
            return response.status

    async def send(self, body: dict[str, Any]) -> bool | None:
        """True when delivered, False when refused for good, None to retry later."""
        delay = self._delay
        for attempt in range(self._retries + 1):
            try:
                async with asyncio.timeout(self._timeout * 1.5):
                    status = await self._post(body)
            except (TimeoutError, OSError) as exc:
                reason = redact_text(f"{type(exc).__name__}: {exc}", self._secrets)[:300]
            except Exception as exc:  # aiohttp.ClientError and friends
                reason = redact_text(f"{type(exc).__name__}: {exc}", self._secrets)[:300]
            else:
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
                if 400 <= status < 500 and status not in (408, 429):
                    self._log.error(
                        "alert webhook refused the notification",
                        reason=reason,
                        alert=body.get("alert"),
                        status=body.get("status"),
                    )
                    return False
            if attempt < self._retries:
                await asyncio.sleep(delay)
                delay *= 2
        self._log.warning(
            "alert webhook failed; will retry at the next evaluation",
            reason=reason,
            alert=body.get("alert"),
        )
        return None


class AlertEvaluator:
    """Evaluates ``settings``'s rules when this owner holds the fleet's alerts lease.

    Args:
        settings: ``config.alerts``.
        owner: this worker's id.
        sender: where announcements go (default: the webhook of ``settings``, if any).
    """

    def __init__(
        self,
        settings: AlertSettings,
        owner: str,
        *,
        sender: WebhookSender | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.owner = owner
        url = settings.webhook_url
        if sender is None and url is not None:
            sender = WebhookSender(
                url.get_secret_value(),
                timeout=settings.webhook_timeout,
                retries=settings.webhook_retries,
                secrets=secrets,
            )
        self.sender = sender
        self.ttl = max(3 * settings.interval, 10.0)
        self.held = False
        self._log = StructuredLogger("worker_core.alerts", owner=owner)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.rules())

    async def run(self, queue: Queue) -> None:
        """Evaluate every ``interval`` seconds until cancelled (errors are logged)."""
        while True:
            tick = asyncio.ensure_future(self.tick(queue))
            try:
                await asyncio.shield(tick)
            except asyncio.CancelledError:
                # The worker stops: let a tick in progress finish (bounded), or a
                # webhook sent but not yet recorded would be sent again by the next
                # evaluator.
                await asyncio.wait([tick], timeout=5.0)
                if not tick.done():
                    tick.cancel()
                raise
            except Exception as exc:
                self._log.warning(
                    "alert evaluation failed",
                    error_type=type(exc).__name__,
                    error=redact_text(str(exc))[:300],
                )
            await asyncio.sleep(self.settings.interval)

    async def release(self, queue: Queue) -> None:
        """Hand the lease back (graceful stop), so another worker evaluates at once."""
        if self.held:
            self.held = False
            with contextlib.suppress(Exception):
                await queue.release_lease(LEASE, self.owner)

    async def tick(self, queue: Queue) -> list[Notification]:
        """One evaluation; returns the announcements delivered (or logged) now."""
        rules = self.settings.rules()
        self.held, now = await queue.take_lease(LEASE, self.owner, self.ttl)
        if not self.held:
            return []
        stored = {(r["alert"], r["subject"]): _state(r) for r in await queue.alert_states()}
        nxt: dict[tuple[str, str], AlertState] = {}
        for name, rule in rules.items():
            values = dict(
                await queue.alert_values(name, window=rule.window, min_count=rule.min_count)
            )
            if rule.queues is not None:
                values = {s: v for s, v in values.items() if s in rule.queues}
            for subject in set(values) | {s for a, s in stored if a == name}:
                state = step(
                    stored.get((name, subject)),
                    alert=name,
                    subject=subject,
                    value=values.get(subject, 0.0),
                    threshold=rule.threshold,
                    now=now,
                    for_seconds=rule.for_seconds,
                    resolve_after=self.settings.resolve_after,
                )
                if state is not None:
                    nxt[(name, subject)] = state
        for key, prev in stored.items():  # a rule taken out of the configuration resolves
            if key[0] not in rules:
                nxt[key] = replace(prev, status="ok", since=now) if prev.firing else prev
        changed = [s for k, s in nxt.items() if stored.get(k) != s]
        for state in changed:
            before = stored.get((state.alert, state.subject))
            if state.firing != (before is not None and before.firing):
                self._log_change(state, rules)
        if changed and not await queue.save_alert_states(self.owner, [s.row() for s in changed]):
            self.held = False
            return []
        return await self._announce(queue, nxt, rules)

    def _log_change(self, state: AlertState, rules: dict[str, Any]) -> None:
        status = "firing" if state.firing else "resolved"
        rule = rules.get(state.alert)
        text = describe(state, status, rule.window if rule is not None else 0.0)
        log = self._log.error if state.firing else self._log.info
        log(
            f"alert {status}",
            alert=state.alert,
            queue=state.subject,
            value=state.value,
            threshold=state.threshold,
            text=text,
        )

    async def _announce(
        self, queue: Queue, states: dict[tuple[str, str], AlertState], rules: dict[str, Any]
    ) -> list[Notification]:
        done: list[Notification] = []
        settled: list[AlertState] = []
        for state in states.values():
            owed = state.owed
            if owed is None:
                continue
            rule = rules.get(state.alert)
            note = Notification(
                state.alert,
                owed,
                state.subject,
                state.value,
                state.threshold,
                describe(state, owed, rule.window if rule else 0.0),
            )
            delivered: bool | None = True
            if self.sender is not None:
                delivered = await self.sender.send(note.body())
            if delivered is None:
                continue  # retried at the next evaluation
            settled.append(replace(state, notified=owed))
            if delivered:
                done.append(note)
        if settled:
            await queue.save_alert_states(self.owner, [s.row() for s in settled])
        return done


def _state(row: dict[str, Any]) -> AlertState:
    return AlertState(
        row["alert"],
        row["subject"],
        row["status"],
        float(row["since"]),
        float(row["value"]),
        float(row["threshold"]),
        row["notified"],
    )

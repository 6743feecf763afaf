"""Circuit breakers for asyncio: CircuitBreaker, CircuitState and BreakerRegistry.

``CircuitBreaker`` wraps a ``pybreaker.CircuitBreaker`` and reuses its state
machine, counters and listener protocol, but never hands it a coroutine (pybreaker
would record a success before the coroutine ran). The wrapper decides admission
itself, which adds what pybreaker lacks: an injectable monotonic clock, at most
``half_open_max_calls`` trial calls, excluded errors and cancellation that count
as neither success nor failure, and outcomes of calls admitted before a state
change that no longer move the state. With a ``FleetStore`` (``fleet.py``) the
state is shared by every worker of a schema.

``BreakerRegistry`` is the worker's set of breakers, one per name, configured from
``WorkerConfig.circuit_breaker`` (with per-name overrides), and attaches them to
the fleet table while the worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pybreaker

from .config import BreakerOverride, CircuitBreakerSettings
from .errors import CircuitOpenError, PermanentError, RetryableError
from .fleet import FleetStore
from .logs import StructuredLogger

if TYPE_CHECKING:
    from .fleet import Database, FleetRow

__all__ = ["BreakerRegistry", "CircuitBreaker", "CircuitState", "StateListener"]

T = TypeVar("T")
Clock = Callable[[], float]
Exclusion = type[BaseException] | Callable[[BaseException], bool]

_CLOSED, _OPEN, _HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class CircuitState(enum.StrEnum):
    """Where a circuit is; ``str(state)`` is its value."""

    #: Calls go through; consecutive failures are counted.
    CLOSED = "closed"
    #: Calls are refused with ``CircuitOpenError`` until the reset timeout passes.
    OPEN = "open"
    #: The reset timeout passed: trial calls may probe the service.
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


#: ``callback(breaker_name, old_state, new_state)``, called on every state change.
StateListener = Callable[[str, CircuitState, CircuitState], None]

_STATES = {
    _CLOSED: CircuitState.CLOSED,
    _OPEN: CircuitState.OPEN,
    _HALF_OPEN: CircuitState.HALF_OPEN,
}


@dataclass(frozen=True, slots=True)
class _Permit:
    generation: int
    trial: bool
    #: clock() at admission: a success of a call admitted before the current failure
    #: streak began says the service was up then, not that it is up now.
    admitted_at: float = 0.0


class _NotAwaitableError(TypeError):
    """``call`` was given a function that does not return an awaitable."""


class _Bridge(pybreaker.CircuitBreakerListener):
    """Forwards pybreaker's state changes to the wrapper."""

    def __init__(self, owner: CircuitBreaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._owner._on_transition(old_state.name if old_state else None, new_state.name)


class CircuitBreaker:
    """An asyncio circuit breaker: ``await breaker.call(fn, *args, **kwargs)``.

    Args:
        name: names the protected service in errors, logs and the fleet table.
        fail_max: consecutive failures that open the circuit.
        reset_timeout: seconds the circuit stays open before a trial call.
        exclude: exception types, or predicates ``(exc) -> bool``, that are neither
            failures nor successes. worker_core's ``PermanentError`` and
            ``RetryableError`` (which includes ``CircuitOpenError``) are always
            excluded: they judge the request (bad input, a rate limit), not the
            health of the service.
        half_open_max_calls: trial calls admitted at once after the reset timeout.
        clock: seconds from a monotonic source (``time.monotonic``); tests pass a fake.
        listeners: ``callback(name, old_state, new_state)`` for each state change.
        store: a ``FleetStore`` to share the state with other workers (opt-in).
        busy_retry_after: the ``retry_after`` of calls refused because a trial is in
            flight (default ``min(reset_timeout, 5)``).

    Raises:
        CircuitOpenError: from ``call`` when the circuit refuses the call.
    """

    #: Always excluded (see ``exclude``); a subclass may narrow it.
    NEUTRAL: tuple[type[BaseException], ...] = (PermanentError, RetryableError)

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        exclude: Iterable[Exclusion] = (),
        half_open_max_calls: int = 1,
        clock: Clock | None = None,
        listeners: Iterable[StateListener] = (),
        store: FleetStore | None = None,
        busy_retry_after: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError("a breaker name must be a non-empty string of at most 200 characters")
        if fail_max < 1 or reset_timeout <= 0 or half_open_max_calls < 1:
            raise ValueError(
                f"breaker {name!r}: need fail_max >= 1, reset_timeout > 0, half_open_max_calls >= 1"
            )
        self.name = name
        self.reset_timeout = float(reset_timeout)
        self.half_open_max_calls = half_open_max_calls
        self.exclude = tuple(exclude)
        self.busy_retry_after = (
            min(self.reset_timeout, 5.0) if busy_retry_after is None else float(busy_retry_after)
        )
        self._clock: Clock = clock or time.monotonic
        self._listeners: list[StateListener] = list(listeners)
        self._log = StructuredLogger("worker_core.breaker", breaker=name)
        self._generation = 0  # bumped on every local transition
        self._trials = 0  # trial calls in flight
        self._reopen_at = 0.0  # clock() time at which an open circuit may be probed
        self._next_reopen_at: float | None = None
        self._source = "local"
        self._store = store
        self._fleet_generation = 0
        self._fleet_failures = 0
        self._fleet_permit = False
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._streak_since: float | None = None  # clock() of the streak's first failure
        # pybreaker keeps the state, counters and listeners; its own exclusion list
        # stays empty because it would count excluded errors as successes.
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            exclude=[],
            listeners=[_Bridge(self)],
            name=name,
            throw_new_error_on_trip=True,
        )
        if store is not None:
            store.register(self)

    # -- state ---------------------------------------------------------------------
    @property
    def fail_max(self) -> int:
        return self._cb.fail_max

    @property
    def failure_count(self) -> int:
        """Consecutive failures seen by this breaker (this process)."""
        return self._cb.fail_counter

    @property
    def fleet_wide(self) -> bool:
        """True when the state is shared through a FleetStore (attached or not)."""
        return self._store is not None

    @property
    def store(self) -> FleetStore | None:
        """The FleetStore sharing this breaker's state (tune ``sync_interval`` there)."""
        return self._store

    @property
    def state(self) -> CircuitState:
        """The state; an open circuit whose reset timeout passed reads ``HALF_OPEN``."""
        with self._cb._lock:
            name = self._cb.state.name
            if name == _OPEN and self._clock() >= self._reopen_at:
                return CircuitState.HALF_OPEN
            return _STATES[name]

    @property
    def retry_after(self) -> float:
        """Seconds until a call may be admitted (0 when it would be now)."""
        with self._cb._lock:
            name = self._cb.state.name
            if name == _CLOSED:
                return 0.0
            if name == _OPEN:
                wait = self._reopen_at - self._clock()
                if wait > 0:
                    return wait
            return self.busy_retry_after if self._trials >= self.half_open_max_calls else 0.0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view for health checks and metrics."""
        return {
            "state": str(self.state),
            "failures": self.failure_count,
            "fail_max": self.fail_max,
            "reset_timeout": self.reset_timeout,
            "retry_after": round(self.retry_after, 3),
            "fleet_wide": self._store is not None and self._store.active,
        }

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: StateListener) -> None:
        self._listeners.remove(listener)

    def is_excluded(self, exc: BaseException) -> bool:
        """True when ``exc`` is neither a failure nor a success."""
        if isinstance(exc, self.NEUTRAL):
            return True
        for rule in self.exclude:
            if isinstance(rule, type):
                if isinstance(exc, rule):
                    return True
            else:
                with contextlib.suppress(Exception):
                    if rule(exc):
                        return True
        return False

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state.value!r})"

    # -- calling -------------------------------------------------------------------
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` if the circuit admits it, and record the outcome.

        Raises:
            CircuitOpenError: the circuit is open, or its trial permits are taken;
                ``fn`` was not called.
        """
        gate = self._suspect_gate()
        if gate is not None:
            await gate.acquire()
        try:
            return await self._call(fn, *args, **kwargs)
        finally:
            if gate is not None:
                gate.release()

    def _suspect_gate(self) -> asyncio.Lock | None:
        """While a closed circuit has counted failures, this worker's calls go one at a
        time: each is admitted on the verdict of the one before (and, fleet-wide, on
        a fresh read), so an outage costs fail_max calls, not fail_max + concurrency."""
        if self._cb.current_state != _CLOSED or self.fail_max <= 1:
            return None
        if max(self._fleet_failures, self._cb.fail_counter) == 0:
            return None
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Lock())  # a Lock belongs to one event loop
        return self._gate[1]

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        permit = await self._admit()
        try:
            pending = fn(*args, **kwargs)
            if not inspect.isawaitable(pending):
                raise _NotAwaitableError(
                    f"breaker {self.name!r}: {getattr(fn, '__name__', fn)!r} returned "
                    f"{type(pending).__name__}, not an awaitable; pass an async function"
                )
            result = await pending
        except Exception as exc:
            # A misuse of call() says nothing about the service either.
            if isinstance(exc, _NotAwaitableError) or self.is_excluded(exc):
                await self._neutral(permit)
            else:
                await self._failure(permit, exc)
            raise
        except BaseException:
            # Cancellation (and KeyboardInterrupt) is no verdict on the service; the
            # permit goes back without awaiting anything, so cancellation is not delayed.
            self._abandon(permit)
            raise
        await self._success(permit)
        return result

    def _rejection(self, wait: float) -> CircuitOpenError:
        wait = max(wait, 0.0)
        return CircuitOpenError(
            f"circuit {self.name!r} is open; retry in {wait:.3g}s",
            breaker=self.name,
            retry_after=wait,
        )

    async def _admit(self) -> _Permit:
        store = self._store
        fleet = store is not None and store.active
        if fleet:
            assert store is not None
            # While a closed circuit is recording failures, read the shared state on
            # every call: that is when another worker may have just tripped it.
            suspect = self._fleet_failures > 0 and self._cb.current_state == _CLOSED
            await store.refresh(max_age=0.0 if suspect else None)
        with self._cb._lock:
            name = self._cb.state.name
            if name == _CLOSED:
                return _Permit(self._generation, trial=False, admitted_at=self._clock())
            now = self._clock()
            if name == _OPEN and now < self._reopen_at:
                raise self._rejection(self._reopen_at - now)
            if self._trials >= self.half_open_max_calls:
                raise self._rejection(self.busy_retry_after)
            # Taken before any await, so racing callers see the slot as used.
            self._trials += 1
        if fleet:
            # Claimed (or renewed) for every trial: a permit this breaker believes it
            # holds may have expired and gone to another worker meanwhile.
            assert store is not None
            try:
                row = await store.claim_trial(self)
            except BaseException:
                with self._cb._lock:
                    self._trials -= 1
                store.spawn(store.release_trial(self))
                raise
            if row is not None:
                self.apply_fleet_row(row)
                if row.state == "open" and not row.mine:
                    with self._cb._lock:
                        self._trials -= 1
                        wait = row.remaining if row.remaining > 0 else self.busy_retry_after
                        if self._cb.state.name == _OPEN:
                            self._reopen_at = max(self._reopen_at, self._clock() + wait)
                    raise self._rejection(wait)
            # No row (database unavailable) or a closed row: probe on local authority.
        with self._cb._lock:
            name = self._cb.state.name
            if name == _CLOSED:  # the fleet closed it while we asked
                self._trials -= 1
                return _Permit(self._generation, trial=False, admitted_at=self._clock())
            if name == _OPEN:
                self._cb.half_open()
            return _Permit(self._generation, trial=True, admitted_at=self._clock())

    def _end(self, permit: _Permit) -> bool:
        """Free the permit's trial slot; False when the state moved since admission."""
        if permit.trial:
            self._trials -= 1
        # An outcome of a call admitted before the last transition says nothing about
        # the new state (a slow call started before the trip, a trial that lost a race).
        return permit.generation == self._generation

    async def _failure(self, permit: _Permit, exc: BaseException) -> None:
        with self._cb._lock:
            if not self._end(permit):
                return
            before = self._cb.state.name
            try:
                self._cb.state._handle_error(exc, reraise=False)
            except pybreaker.CircuitBreakerError:
                pass  # pybreaker signals the trip by raising; the caller gets exc instead
            tripped = before != _OPEN and self._cb.state.name == _OPEN
            if self._streak_since is None:
                self._streak_since = self._clock()
        store = self._store
        if store is not None and store.active:
            row = await store.record_failure(self, trip=tripped)
            if row is not None:
                self.apply_fleet_row(row)

    async def _success(self, permit: _Permit) -> None:
        with self._cb._lock:
            if not self._end(permit):
                return
            before = self._cb.state.name
            if (
                before == _CLOSED
                and not permit.trial
                and self._streak_since is not None
                and permit.admitted_at < self._streak_since
            ):
                return  # a call admitted before the failures began: no news about now
            self._streak_since = None
            had_failures = self._cb.fail_counter > 0 or self._fleet_failures > 0
            self._cb.state._handle_success()
            closed_now = before != _CLOSED and self._cb.state.name == _CLOSED
            self._fleet_failures = 0
        store = self._store
        # Healthy traffic costs no write: only a close or a streak to reset is published.
        if store is not None and store.active and (closed_now or had_failures):
            row = await store.record_success(self, trial=permit.trial)
            if row is not None:
                self.apply_fleet_row(row)

    async def _neutral(self, permit: _Permit) -> None:
        if self._give_back(permit):
            assert self._store is not None
            await self._store.release_trial(self)

    def _abandon(self, permit: _Permit) -> None:
        if self._give_back(permit):
            assert self._store is not None
            self._store.spawn(self._store.release_trial(self))

    def _give_back(self, permit: _Permit) -> bool:
        with self._cb._lock:
            self._end(permit)
            if permit.trial and self._trials == 0 and self._fleet_permit:
                self._fleet_permit = False
                return self._store is not None and self._store.active
            return False

    # -- transitions ---------------------------------------------------------------
    def _on_transition(self, old: str | None, new: str) -> None:
        if old == new:
            return
        self._generation += 1
        if new == _CLOSED:
            self._streak_since = None
        if new == _OPEN:
            self._reopen_at = (
                self._next_reopen_at
                if self._next_reopen_at is not None
                else self._clock() + self.reset_timeout
            )
        old_state = _STATES.get(old or _CLOSED, CircuitState.CLOSED)
        new_state = _STATES[new]
        fields: dict[str, Any] = {
            "old": old_state.value,
            "new": new_state.value,
            "source": self._source,
            "failures": self._cb.fail_counter,
        }
        if new == _OPEN:
            fields["retry_after"] = round(max(self._reopen_at - self._clock(), 0.0), 3)
            self._log.warning("circuit opened", **fields)
        elif new == _HALF_OPEN:
            self._log.info("circuit half-open: probing", **fields)
        else:
            self._log.info("circuit closed", **fields)
        for listener in list(self._listeners):
            try:
                listener(self.name, old_state, new_state)
            except Exception:
                self._log.exception("breaker listener failed", listener=repr(listener))

    def _force(self, target: str, reopen_in: float = 0.0) -> None:
        """Move the local state to what the fleet decided (listeners see source=fleet)."""
        self._source = "fleet"
        try:
            if target == _OPEN:
                self._next_reopen_at = self._clock() + reopen_in
                self._cb.open()
            else:
                self._cb.close()
        finally:
            self._source = "local"
            self._next_reopen_at = None

    def apply_fleet_row(self, row: FleetRow) -> None:
        """Fold a row of the fleet table into the local state (called by FleetStore)."""
        with self._cb._lock:
            if row.generation < self._fleet_generation:
                return  # a read that started before a write we already applied
            self._fleet_failures = row.failures
            self._fleet_permit = row.mine
            if row.failures == 0:
                self._streak_since = None
            elif self._streak_since is None:
                self._streak_since = self._clock()  # learnt of a fleet streak just now
            newer = row.generation > self._fleet_generation
            first = self._fleet_generation == 0
            self._fleet_generation = row.generation
            local = self._cb.state.name
            if row.state == "open":
                if local != _OPEN and newer:
                    self._force(_OPEN, row.remaining)
                elif local == _OPEN:
                    fleet_reopen = self._clock() + row.remaining
                    self._reopen_at = fleet_reopen if newer else max(self._reopen_at, fleet_reopen)
            elif local == _CLOSED and row.failures < self._cb.fail_counter:
                # A success elsewhere reset the fleet's streak: ours restarts from there.
                storage = self._cb._state_storage
                storage.reset_counter()
                for _ in range(row.failures):
                    storage.increment_counter()
            elif newer and not first and local != _CLOSED:
                # Another worker's trial closed it. On the first read a closed row
                # proves nothing: this breaker may have tripped while detached.
                self._force(_CLOSED)


class BreakerRegistry:
    """One shared CircuitBreaker per name, configured from ``CircuitBreakerSettings``.

    ``get(name)`` creates on first use; ``registry[name]``, ``in``, ``len``,
    iteration, ``keys()``, ``values()`` and ``items()`` see the breakers created so
    far. Breakers whose setting ``fleet_wide`` is on share their state through
    ``store`` once ``await attach(queue)`` ran, until ``await detach()``.
    """

    def __init__(
        self,
        settings: CircuitBreakerSettings | None = None,
        *,
        clock: Clock | None = None,
        listeners: Iterable[StateListener] = (),
        store: FleetStore | None = None,
    ) -> None:
        self.settings = settings or CircuitBreakerSettings()
        sync_interval = getattr(self.settings, "sync_interval", None)
        self.store = store or FleetStore(
            clock=clock, sync_interval=0.25 if sync_interval is None else float(sync_interval)
        )
        self._clock = clock
        self._listeners: list[StateListener] = list(listeners)
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str, *, exclude: Iterable[Exclusion] = ()) -> CircuitBreaker:
        """The breaker ``name``, created from the settings on first use (``exclude``
        applies only then)."""
        breaker = self._breakers.get(name)
        if breaker is None:
            s = self.settings
            o = s.overrides.get(name) or BreakerOverride()
            fleet = s.fleet_wide if o.fleet_wide is None else o.fleet_wide
            breaker = CircuitBreaker(
                name,
                fail_max=s.fail_max if o.fail_max is None else o.fail_max,
                reset_timeout=s.reset_timeout if o.reset_timeout is None else o.reset_timeout,
                half_open_max_calls=(
                    s.half_open_max_calls
                    if o.half_open_max_calls is None
                    else o.half_open_max_calls
                ),
                exclude=exclude,
                clock=self._clock,
                listeners=self._listeners,
                store=self.store if fleet else None,
            )
            self._breakers[name] = breaker
        return breaker

    def add_listener(self, listener: StateListener) -> None:
        """Listen to every breaker, present and future."""
        self._listeners.append(listener)
        for breaker in self._breakers.values():
            breaker.add_listener(listener)

    async def attach(self, queue: Database) -> None:
        """Share fleet-wide breakers through ``queue``'s schema (never raises on DB errors)."""
        await self.store.attach(queue)

    async def detach(self) -> None:
        """Give back trial permits and go local; breakers keep their state."""
        await self.store.detach()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: b.snapshot() for name, b in self._breakers.items()}

    def __getitem__(self, name: str) -> CircuitBreaker:
        return self._breakers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._breakers))

    def __len__(self) -> int:
        return len(self._breakers)

    def keys(self) -> list[str]:
        return list(self._breakers)

    def values(self) -> list[CircuitBreaker]:
        return list(self._breakers.values())

    def items(self) -> list[tuple[str, CircuitBreaker]]:
        return list(self._breakers.items())

    def __repr__(self) -> str:
        return f"BreakerRegistry({sorted(self._breakers)!r}, attached={self.store.active})"

"""Infrastructure of the fault tests: worker processes, PgBouncer, network
namespaces, and the oracle that judges a run from the database's own history.

The oracle is a trigger on the jobs table that records every status change, so
"duplicated outcomes" and "a write to a finished job" are read from what the
database did, not from what the workers say they did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

FLEET_WORKER = Path(__file__).with_name("fleet_worker.py")
IN_CI = os.environ.get("CI", "").lower() == "true"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def require(ok: bool, why: str) -> None:
    """Skip with one line when the machine cannot run this test; in CI, fail."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{why}: CI must run this test (run `make system-deps` as root)")
    pytest.skip(why)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll ``predicate`` (sync or async) until true; returns the seconds it took.

    Used where the signal is outside this process (a kernel socket table, another
    server), so there is no event to wait on.
    """
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


# -- worker processes ----------------------------------------------------------------
@dataclass
class WorkerProcess:
    """A ``fleet_worker.py`` process and every line it printed, with arrival times."""

    role: str
    proc: asyncio.subprocess.Process
    lines: list[tuple[float, str]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, role: str, env: Mapping[str, str], *, netns: Netns | None = None
    ) -> WorkerProcess:
        argv = [sys.executable, str(FLEET_WORKER)]
        if netns is not None:
            argv = netns.exec_argv(argv)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, "WC_ROLE": role, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        worker = cls(role, proc)
        worker.reader = asyncio.create_task(worker._read())
        await worker.wait_line(lambda w: w[0] == "READY", timeout=60, what=f"{role} ready")
        return worker

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            async with self.changed:
                self.lines.append((time.monotonic(), line.decode(errors="replace").rstrip()))
                self.changed.notify_all()
        async with self.changed:
            self.changed.notify_all()

    def words(self, first: str) -> list[tuple[float, list[str]]]:
        """The plain lines starting with ``first``, split, with their arrival times."""
        return [(t, text.split()) for t, text in self.lines if text.split()[:1] == [first]]

    def logs(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records whose event starts with ``event``."""
        found = []
        for t, text in self.lines:
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(text)
                    if str(record.get("event", "")).startswith(event):
                        found.append({**record, "_t": t})
        return found

    async def wait_line(
        self, predicate: Callable[[list[str]], bool], *, timeout: float, what: str
    ) -> float:
        """Wait for a plain line that satisfies ``predicate``; returns its arrival time."""
        return float(
            await self._wait(
                lambda: next(
                    (t for t, text in self.lines if predicate(text.split() or [""])), None
                ),
                timeout=timeout,
                what=what,
            )
        )

    async def wait_count(self, first: str, ids: set[int], *, timeout: float, what: str) -> float:
        """Wait until ``first <id> ...`` lines cover every id of ``ids``."""

        def done() -> float | None:
            seen = {int(w[1]) for t, w in self.words(first) if int(w[1]) in ids}
            return max((t for t, w in self.words(first)), default=None) if seen == ids else None

        return float(await self._wait(done, timeout=timeout, what=what))

    async def wait_log(self, event: str, *, timeout: float, what: str) -> dict[str, Any]:
        await self._wait(lambda: self.logs(event) or None, timeout=timeout, what=what)
        return self.logs(event)[0]

    async def _wait(self, found: Callable[[], Any], *, timeout: float, what: str) -> Any:
        async def ready() -> Any:
            async with self.changed:
                while (value := found()) is None and self.proc.returncode is None:
                    if self.reader is not None and self.reader.done():
                        break
                    await self.changed.wait()
                return value

        try:
            value = await asyncio.wait_for(ready(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.role}: {what} not seen within {timeout}s") from None
        if value is None:
            tail = "\n".join(text for _, text in self.lines[-15:])
            raise AssertionError(f"{self.role} exited before {what}:\n{tail}")
        return value

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            await self.reader
        assert self.proc.returncode is not None
        return self.proc.returncode


def worker_env(dsn: str, schema: str, **extra: str | float | int) -> dict[str, str]:
    env = {"WC_DSN": dsn, "WC_SCHEMA": schema}
    env.update({f"WC_{k.upper()}": str(v) for k, v in extra.items()})
    return env


# -- the oracle ----------------------------------------------------------------------
ORACLE = """
CREATE TABLE {schema}.transitions (
    n          bigserial PRIMARY KEY,
    job_id     bigint      NOT NULL,
    old_status text        NOT NULL,
    new_status text        NOT NULL,
    attempt    integer     NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION {schema}.log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.transitions (job_id, old_status, new_status, attempt)
    VALUES (NEW.id, OLD.status, NEW.status, NEW.attempt);
    RETURN NULL;
END $$;
CREATE TRIGGER log_transition AFTER UPDATE ON {schema}.jobs
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
EXECUTE FUNCTION {schema}.log_transition();
"""


async def install_oracle(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    await conn.execute(sql.SQL(ORACLE).format(schema=sql.Identifier(schema)))


@dataclass
class Verdict:
    """What the database says happened to the jobs ``ids``."""

    jobs: int
    statuses: Counter[str]
    #: Jobs that moved to succeeded more than once.
    duplicated: int
    #: Status changes of a job that had already finished (none may happen).
    finished_touched: int

    @property
    def lost(self) -> int:
        return self.jobs - self.statuses["succeeded"] - self.statuses["dead"]

    @property
    def stuck(self) -> int:
        return self.statuses["running"] + self.statuses["queued"]

    def assert_clean(self) -> None:
        assert self.statuses == Counter(succeeded=self.jobs), self
        assert (self.lost, self.stuck, self.duplicated, self.finished_touched) == (0, 0, 0, 0)


async def verdict(conn: psycopg.AsyncConnection[Any], schema: str, ids: Sequence[int]) -> Verdict:
    s = sql.Identifier(schema)
    cur = await conn.execute(
        sql.SQL("SELECT status, count(*) FROM {}.jobs WHERE id = ANY(%s) GROUP BY status").format(
            s
        ),
        (list(ids),),
    )
    statuses: Counter[str] = Counter({row[0]: int(row[1]) for row in await cur.fetchall()})
    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*) FROM (SELECT job_id FROM {}.transitions "
            "WHERE new_status = 'succeeded' AND job_id = ANY(%s) "
            "GROUP BY job_id HAVING count(*) > 1) AS d"
        ).format(s),
        (list(ids),),
    )
    duplicated = int((await cur.fetchone() or [0])[0])
    cur = await conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {}.transitions "
            "WHERE old_status IN ('succeeded', 'cancelled') AND job_id = ANY(%s)"
        ).format(s),
        (list(ids),),
    )
    touched = int((await cur.fetchone() or [0])[0])
    return Verdict(len(ids), statuses, duplicated, touched)


def executions(workers: Sequence[WorkerProcess]) -> Counter[int]:
    """How many times each job's stage started, across ``workers``."""
    runs: Counter[int] = Counter()
    for worker in workers:
        for _, words in worker.words("RAN"):
            runs[int(words[1])] += 1
    return runs


def report(name: str, **figures: object) -> None:
    """One line of figures, printed for the record (pytest -s shows it)."""
    parts = " ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[{name}] {parts}", flush=True)


# -- PgBouncer -----------------------------------------------------------------------
def run_as_user(path: Path) -> str | None:
    """Who server processes run as: PostgreSQL and PgBouncer refuse root, so as
    root they run as the owner of the embedded server's data directory."""
    return pwd.getpwuid(path.stat().st_uid).pw_name if IS_ROOT else None


class PgBouncer:
    """A PgBouncer in transaction mode on a free loopback port, in front of a
    server reached over its Unix socket."""

    def __init__(self, socket_dir: Path, port: int, *, pool_size: int, user: str | None) -> None:
        self.binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.socket_dir = socket_dir
        self.server_port = port
        self.pool_size = pool_size
        self.user = user
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wc-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres:@127.0.0.1:{self.port}/postgres"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres:@127.0.0.1:{self.port}/pgbouncer"

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.split("\n", 1)[0].strip()

    def version_tuple(self) -> tuple[int, ...]:
        match = re.search(r"(\d+)\.(\d+)", self.version())
        return (int(match[1]), int(match[2])) if match else (0, 0)

    def start(self) -> None:
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"postgres = host={self.socket_dir} port={self.server_port} dbname=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'users.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            "max_client_conn = 500\n"
            # 1.21+ can carry protocol-level prepared statements (on by default from
            # 1.22); off, every version behaves as 1.18 does, the case to survive.
            + ("max_prepared_statements = 0\n" if self.version_tuple() >= (1, 21) else "")
            + f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.proc = subprocess.Popen(
            [self.binary, str(self.dir / "pgbouncer.ini")],
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:  # readiness has no event to wait on: poll the port
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}: {self.log()}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not answer: {self.log()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """Crash it (SIGKILL): every client and server connection drops at once."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(15)
        (self.dir / "pgbouncer.pid").unlink(missing_ok=True)

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def pools(self) -> dict[str, int]:
        """``SHOW POOLS`` of the admin console for database postgres (client and
        server connection counts)."""
        # The admin console speaks the simple query protocol only.
        with psycopg.connect(
            self.admin_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.execute("SHOW POOLS")
            names = [d.name for d in cur.description or []]
            for row in cur.fetchall():
                record = dict(zip(names, row, strict=True))
                if record["database"] == "postgres":
                    return {k: int(v) for k, v in record.items() if isinstance(v, int)}
        return {}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- network namespaces ----------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=check, timeout=30)


class Netns:
    """A network namespace whose only way out is one veth pair to this host.

    Host side ``host_addr`` (where the test server listens), namespace side
    ``ns_addr``; a /30 of 10.254.0.0/16 that no interface of this host uses.
    Faults: ``cut`` (the host end down: nothing passes, silently), ``drop_replies``
    (a blackhole route for the namespace's address: its packets still arrive, no
    answer ever leaves, the half-open case), ``slow`` (tc on both ends).
    """

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{int(time.monotonic() * 1000) % 1000:03d}"[-8:]
        self.name = f"wcns{tag}"
        self.host_if = f"wch{tag}"
        self.ns_if = f"wcn{tag}"
        self.subnet = self._free_subnet()
        self.host_addr = f"10.254.{self.subnet}.1"
        self.ns_addr = f"10.254.{self.subnet}.2"
        self.cidr = f"10.254.{self.subnet}.0/30"
        self.slow_kind: str | None = None

    @staticmethod
    def _free_subnet() -> int:
        used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
        for third in range(17, 250):
            if f"10.254.{third}." not in used:
                return third
        raise RuntimeError("no free 10.254.x.0/30 subnet")

    def create(self) -> None:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def drop_replies(self) -> None:
        _ip("route", "add", "blackhole", f"{self.ns_addr}/32")

    def pass_replies(self) -> None:
        _ip("route", "del", "blackhole", f"{self.ns_addr}/32")

    def slow(self, delay_ms: int) -> str:
        """Slow both directions; returns what was applied.

        ``netem`` adds ``delay_ms`` each way where the kernel has it (sch_netem);
        kernels built without it get a token bucket (``tbf``) at 96 kbit/s instead,
        which delays every packet by its size (a 1.5 kB packet ~125 ms) plus its
        queue: a slow link too, with latency that grows with the load.
        """
        for dev, ns in ((self.host_if, None), (self.ns_if, self.name)):
            prefix = ["-n", ns] if ns else []
            netem = _tc(*prefix, "qdisc", "add", "dev", dev, "root", "netem", "delay",
                        f"{delay_ms}ms", check=False)  # fmt: skip
            if netem.returncode == 0:
                self.slow_kind = f"netem delay {delay_ms}ms each way"
                continue
            _tc(*prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "96kbit",
                "burst", "1600", "latency", "1s")  # fmt: skip
            self.slow_kind = "tbf 96kbit/s each way (no netem in this kernel)"
        assert self.slow_kind is not None
        return self.slow_kind

    def fast(self) -> None:
        _tc("qdisc", "del", "dev", self.host_if, "root", check=False)
        _tc("-n", self.name, "qdisc", "del", "dev", self.ns_if, "root", check=False)

    def established(self, port: int) -> int:
        """TCP connections from the namespace to ``host_addr:port`` the kernel
        still holds as established."""
        out = subprocess.run(
            self.exec_argv(["ss", "-Htn", "state", "established", "dst", f"{self.host_addr}:{port}"]),
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        return sum(1 for line in out.splitlines() if line.strip())

    def destroy(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)


def netns_available() -> tuple[bool, str]:
    """Whether this machine can build namespaces (root, iproute2, ss)."""
    if not IS_ROOT:
        return False, "network namespaces need root"
    for tool in ("ip", "tc", "ss"):
        if shutil.which(tool) is None:
            return False, f"{tool} is missing (iproute2; `make system-deps` installs it)"
    name = f"wcprobe{os.getpid()}"
    probe = _ip("netns", "add", name, check=False)
    _ip("netns", "del", name, check=False)
    if probe.returncode != 0:
        return False, f"cannot create a network namespace: {probe.stderr.strip()}"
    return True, ""

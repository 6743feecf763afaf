"""Fixtures of the infrastructure-fault tests: PgBouncer, a network namespace with
its own server, a primary with a streaming standby.

They need root (namespaces; PgBouncer and PostgreSQL then run as the embedded
server's user) and Debian's pgbouncer and iproute2 packages, which
`make system-deps` installs. Elsewhere each test skips with one line; with
CI=true it fails instead.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra import IS_ROOT, Netns, PgBouncer, free_port, netns_available, require

from worker_core.embedded import EmbeddedPostgres

# Throwaway servers: no fsync (the machine does not crash, only PostgreSQL does).
FAST: dict[str, str | int | float] = {
    "max_connections": 300,
    "fsync": "off",
    "full_page_writes": "off",
}


@pytest.fixture(scope="module")
def pgbouncer(pg_server: Any) -> Iterator[PgBouncer]:
    """PgBouncer (transaction mode, 6 server connections) in front of the test server."""
    require(pg_server is not None, "PgBouncer tests need the embedded server")
    require(shutil.which("pgbouncer") is not None or Path("/usr/sbin/pgbouncer").exists(),
            "pgbouncer is not installed (`make system-deps` installs it as root)")  # fmt: skip
    user = None
    if IS_ROOT:
        from infra import run_as_user

        user = run_as_user(pg_server.data_dir)
    bouncer = PgBouncer(pg_server.data_dir, pg_server.port, pool_size=6, user=user)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    ok, why = netns_available()
    require(ok, why)
    space = Netns()
    space.create()
    try:
        yield space
    finally:
        space.destroy()


@pytest.fixture(scope="module")
def net_server(netns: Netns) -> Iterator[EmbeddedPostgres]:
    """A server listening on the veth's host-side address (and its Unix socket)."""
    server = EmbeddedPostgres(
        settings={**FAST, "synchronous_commit": "off"},
        host=netns.host_addr,
        port=free_port(netns.host_addr),
        trusted=[netns.cidr],
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def replica_pair() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """A primary on 127.0.0.1 and its streaming standby (asynchronous until the test
    sets synchronous_standby_names)."""
    base = Path(tempfile.mkdtemp(prefix="wc-pg-"))
    primary = EmbeddedPostgres(base / "primary", settings=FAST, host="127.0.0.1", port=free_port())
    standby: EmbeddedPostgres | None = None
    try:
        primary.start()
        standby = primary.standby(base / "standby", port=free_port())
        yield primary, standby
    finally:
        for server in (standby, primary):
            if server is not None:
                server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)

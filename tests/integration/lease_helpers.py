"""Ending a running job's lease from a test, as if its worker had hung."""

from __future__ import annotations

from psycopg import sql

from worker_core import Queue


async def expire_and_rescue(queue: Queue, job_id: int, *, tries: int = 20) -> list[int]:
    """Put the lease of ``job_id`` in the past and rescue it; return the rescued ids.

    A live worker renews the leases it holds on its own (at each heartbeat, and once
    when its LISTEN connection comes up), so a renewal may land between the update
    and the rescue: then the lease is ended again, a bounded number of times.
    """
    rescued: list[int] = []
    for _ in range(tries):
        async with queue.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {}.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = %s"
                ).format(sql.Identifier(queue.schema)),
                (job_id,),
            )
        rescued = [row[0] for row in await queue.rescue_expired()]
        if rescued:
            break
    return rescued

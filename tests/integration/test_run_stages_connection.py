"""run_stages(connection=...): ctx.connection() lends the caller's connection."""

from __future__ import annotations

import psycopg

from worker_core import StageContext
from worker_core.testing import arun_stages


class Lookup:
    name = "lookup"

    async def run(self, ctx: StageContext) -> None:
        async with ctx.connection() as conn:
            cur = await conn.execute("SELECT %s::int * 2", (ctx.job.payload["n"],))
            row = await cur.fetchone()
        assert row is not None
        ctx.state["doubled"] = row[0]


async def test_the_given_connection_is_lent_and_left_open(pg_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        assert await arun_stages([Lookup()], {"n": 21}, connection=conn) == {"doubled": 42}
        assert not conn.closed

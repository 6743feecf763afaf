"""A worker process for the infrastructure-fault tests: ``python fleet_worker.py``.

Configured from the environment: WC_DSN, WC_SCHEMA, WC_ROLE (a name for this
process), and optionally WC_LISTEN_DSN, WC_LEASE, WC_CONCURRENCY, WC_POLL,
WC_CONNECT_TIMEOUT and WC_TCP ("idle,interval,count,user_timeout" seconds).

It logs JSON lines on stdout and prints, for the test to read:
``RAN <job> <attempt> <role>`` when the stage starts, ``DONE <job> <attempt>`` when
it ends, ``STOPPED <job> <attempt> <exception type>`` when the stage is stopped
from outside (the lease was lost, or shutdown), ``ACKED <job> <attempt>`` once the
success was written. A job's payload may hold
``{"sleep": {"<role>": seconds}}``: how long its stage takes in that role
(default: a few milliseconds), and ``{"checkpoint_every": seconds}``: the stage
then checkpoints its progress at that interval.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from worker_core import BaseWorker, Job, StageContext, WorkerConfig, configure_logging

ROLE = os.environ.get("WC_ROLE", "worker")


def say(*parts: object) -> None:
    print(*parts, flush=True)


class Work:
    name = "work"

    async def run(self, ctx: StageContext) -> None:
        job = ctx.job
        say("RAN", job.id, job.attempt, ROLE)
        seconds = float(job.payload.get("sleep", {}).get(ROLE, 0.003))
        every = float(job.payload.get("checkpoint_every", 0) or seconds)
        try:
            # A long stage records its progress as it goes (ctx.checkpoint), which is
            # also where it hears that its lease was lost.
            done = 0.0
            while done < seconds:
                await asyncio.sleep(min(every, seconds - done))
                done += every
                if done < seconds:
                    ctx.state["progress"] = done
                    await ctx.checkpoint()
        except BaseException as exc:
            say("STOPPED", job.id, job.attempt, type(exc).__name__)
            raise
        ctx.state["by"] = ROLE
        say("DONE", job.id, job.attempt)


class FleetWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Work()]

    async def on_job_done(self, job: Job) -> None:
        # Called once the outcome write is confirmed: the acknowledgement a failover
        # must not take back (with synchronous replication).
        say("ACKED", job.id, job.attempt)


def config_from_env() -> WorkerConfig:
    lease = float(os.environ.get("WC_LEASE", "3"))
    database: dict[str, Any] = {
        "dsn": os.environ["WC_DSN"],
        "schema": os.environ["WC_SCHEMA"],
        "connect_timeout": float(os.environ.get("WC_CONNECT_TIMEOUT", "2")),
        "application_name": f"worker_core.{ROLE}",
    }
    if os.environ.get("WC_LISTEN_DSN"):
        database["listen_dsn"] = os.environ["WC_LISTEN_DSN"]
    if os.environ.get("WC_TCP"):
        idle, interval, count, user_timeout = os.environ["WC_TCP"].split(",")
        database.update(
            keepalives_idle=int(idle),
            keepalives_interval=int(interval),
            keepalives_count=int(count),
            tcp_user_timeout=float(user_timeout),
        )
    return WorkerConfig(
        environment="test",
        database=database,
        queue={
            "name": "test",
            "concurrency": int(os.environ.get("WC_CONCURRENCY", "8")),
            "lease_seconds": lease,
            "heartbeat_seconds": lease / 4,
            "poll_interval": float(os.environ.get("WC_POLL", "0.2")),
            "shutdown_timeout": 5,
        },
        retry={"base_delay": 0.01, "max_delay": 0.1},
    )


async def main() -> None:
    configure_logging(level="INFO", fmt="json", stream=sys.stdout)
    worker = FleetWorker(config_from_env())
    say("READY", worker.worker_id)
    await worker.run()
    summary = worker.metrics.summary()
    say("EXITED", summary["processed"])


if __name__ == "__main__":
    asyncio.run(main())

"""A DocumentWorker process for the chaos tests: ``python doc_worker_proc.py``.

Configuration from the environment: WC_DSN, WC_SCHEMA, WC_STORAGE (a directory),
optional WC_EMBED_URL (an OpenAI-compatible endpoint; hashing embedder otherwise),
WC_LEASE, WC_CONCURRENCY. Prints READY once it runs.
"""

from __future__ import annotations

import asyncio
import os

from worker_core import WorkerConfig
from worker_core.ingest import DocumentWorker


def config_from_env() -> WorkerConfig:
    lease = float(os.environ.get("WC_LEASE", "2"))
    embed_url = os.environ.get("WC_EMBED_URL")
    embedding: dict[str, object] = {"provider": "hashing", "dimensions": 384}
    if embed_url:
        embedding = {
            "provider": "http", "endpoint": embed_url, "api_key": "sk-chaos-test-key",
            "dimensions": 384, "batch_size": 16, "timeout": 1.0,
        }  # fmt: skip
    return WorkerConfig.model_validate(
        {
            "environment": "test",
            "database": {"dsn": os.environ["WC_DSN"], "schema": os.environ["WC_SCHEMA"]},
            "queue": {
                "name": "docs",
                "concurrency": int(os.environ.get("WC_CONCURRENCY", "4")),
                "lease_seconds": lease,
                "heartbeat_seconds": lease / 4,
                "poll_interval": 0.2,
                "shutdown_timeout": 5,
            },
            "retry": {"base_delay": 0.05, "max_delay": 0.5, "max_attempts": 10},
            "circuit_breaker": {"fail_max": 3, "reset_timeout": 0.5},
            "storage": {"backend": "local", "local_root": os.environ["WC_STORAGE"]},
            "embedding": embedding,
            "ingest": {"chunk_size": 600, "chunk_overlap": 60, "batch_size": 8},
        }
    )


async def main() -> None:
    worker = DocumentWorker(config_from_env())
    print("READY", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())

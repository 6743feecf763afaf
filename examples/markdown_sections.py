"""A worker with a custom parsing stage: Markdown documents become one chunk per section.

Stages: ``parse`` validates the payload with pydantic (a bad payload is a dead
letter) and splits the text at headings; ``store`` writes the sections with
``ChunkWriter`` (deterministic ids, so a retry or a re-run writes nothing twice);
``report`` records what was written. Built only on ``worker_core``'s public API.

    python examples/markdown_sections.py   # embedded PostgreSQL unless WORKER_CORE_DATABASE__DSN
"""

from __future__ import annotations

import asyncio
import os
import re

from pydantic import BaseModel, Field

from worker_core import BaseWorker, Chunk, ChunkWriter, Queue, StageContext, WorkerConfig

HEADING = re.compile(r"^(#{1,6})\s+(.+)$", re.MULTILINE)


class MarkdownJob(BaseModel):
    document_id: str = Field(min_length=1)
    markdown: str = Field(min_length=1)


def sections(text: str) -> list[dict[str, str]]:
    """(title, body) pairs, one per heading; text before the first heading is 'preamble'."""
    marks = list(HEADING.finditer(text))
    out = []
    if not marks or marks[0].start() > 0:
        head = text[: marks[0].start()] if marks else text
        if head.strip():
            out.append({"title": "preamble", "body": head.strip()})
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append({"title": mark.group(2).strip(), "body": text[mark.end() : end].strip()})
    return out


class Parse:
    name = "parse"

    async def run(self, ctx: StageContext) -> None:
        job = MarkdownJob.model_validate(ctx.job.payload)  # ValidationError: dead letter
        ctx.state["sections"] = sections(job.markdown)


class Store:
    name = "store"

    def __init__(self, writer: ChunkWriter) -> None:
        self.writer = writer

    async def run(self, ctx: StageContext) -> None:
        document_id = ctx.job.payload["document_id"]
        chunks = [
            Chunk(document_id, i, s["body"] or s["title"], metadata={"title": s["title"]})
            for i, s in enumerate(ctx.state["sections"])
        ]
        async with ctx.connection() as conn, conn.transaction():
            result = await self.writer.write(conn, chunks)
        ctx.state["written"] = {"inserted": result.inserted, "skipped": result.skipped}


class Report:
    name = "report"

    async def run(self, ctx: StageContext) -> None:
        ctx.logger.info("sections stored", **ctx.state["written"])


class MarkdownWorker(BaseWorker):
    def stages(self) -> list[Parse | Store | Report]:
        writer = ChunkWriter(
            self.config.database.schema, dimensions=self.config.embedding.dimensions
        )
        return [Parse(), Store(writer), Report()]


DOCUMENT = """Intro text before any heading.

# Installation
pip install worker-core

## Configuration
Set WORKER_CORE_DATABASE__DSN.

# Usage
Subclass BaseWorker.
"""


async def main(dsn: str) -> None:
    # One job at a time: the second job of the same document then finds its chunks
    # written already (with more, which job writes first would be a race).
    config = WorkerConfig(database={"dsn": dsn, "schema": "example_markdown"},
                          queue={"name": "markdown", "concurrency": 1})  # fmt: skip
    async with Queue(config) as queue:
        await queue.migrate()
        good = await queue.enqueue({"document_id": "readme", "markdown": DOCUMENT})
        again = await queue.enqueue({"document_id": "readme", "markdown": DOCUMENT})
        bad = await queue.enqueue({"document_id": "", "markdown": 42})
    await MarkdownWorker(config).run(until_empty=True)
    async with Queue(config) as queue:
        for job_id in (good, again, bad):
            job = await queue.get(job_id)
            assert job is not None
            if job.last_error and job.status.value == "dead":
                error = job.last_error
                print(f"job {job.id}: dead ({error['type']} at stage {error['stage']})")
            else:
                print(f"job {job.id}: {job.status.value}, {len(job.state['sections'])} sections, "
                      f"written {job.state['written']}")  # fmt: skip


if __name__ == "__main__":
    dsn = os.environ.get("WORKER_CORE_DATABASE__DSN")
    if dsn:
        asyncio.run(main(dsn))
    else:
        from worker_core.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as server:
            asyncio.run(main(server.dsn))

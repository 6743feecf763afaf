"""Every Python code block of README.md and docs/ runs against the test database.

How a page is run (the convention is also written in docs/index.md):

- A block fenced as ```` ```python ```` runs. The blocks of one page run in order in
  one namespace, like cells of a notebook, so a later block may use what an
  earlier one defined. ``await``, ``async with`` and ``async for`` may stand at the
  top level (as in ``python -m asyncio``); ``asyncio.run(...)`` works too.
- ``DSN`` is predefined (your PostgreSQL URL); ``WORKER_CORE_DATABASE__DSN`` and
  ``WORKER_CORE_DATABASE__SCHEMA`` point at a fresh schema of the test database, and
  the working directory is a temporary one.
- A block fenced as ```` ```python fragment ```` is part of something larger (the
  body of a stage, a call that needs a real service): it is only compiled, so it
  must still be valid Python.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker_core.logs import unconfigure_logging

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    info: str
    code: str

    @property
    def language(self) -> str:
        return (self.info.split() or [""])[0].lower()

    @property
    def is_python(self) -> bool:
        return self.language in ("python", "py", "python3")

    @property
    def is_fragment(self) -> bool:
        return "fragment" in self.info.split()[1:]

    def compile(self) -> Any:
        return compile(
            self.code,
            f"{self.page.name}:{self.line}",
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start()) + 2, m["info"].strip(), m["code"])
        for m in FENCE.finditer(text)
    ]


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.is_python]


def _run_page(page_blocks: list[Block], namespace: dict[str, Any]) -> None:
    """Run the blocks in this thread, which has no running event loop."""
    with asyncio.Runner() as runner:
        for block in page_blocks:
            code = block.compile()
            try:
                if code.co_flags & inspect.CO_COROUTINE:
                    runner.run(eval(code, namespace))
                else:
                    exec(code, namespace)
            except Exception as exc:
                raise AssertionError(
                    f"{block.page.name}, the block at line {block.line} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc


def _pages_with_runnable_blocks() -> list[Any]:
    params = []
    for page in PAGES:
        if any(not b.is_fragment for b in python_blocks(page)):
            params.append(pytest.param(page, id=page.name))
    return params


@pytest.mark.timeout(180)
@pytest.mark.parametrize("page", _pages_with_runnable_blocks())
def test_page_runs(
    page: Path, pg_dsn: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", pg_dsn)
    monkeypatch.setenv("WORKER_CORE_DATABASE__SCHEMA", schema)
    monkeypatch.chdir(tmp_path)
    runnable = [b for b in python_blocks(page) if not b.is_fragment]
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}", "DSN": pg_dsn}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(_run_page, runnable, namespace).result(timeout=170)
    finally:
        unconfigure_logging()  # a page may call configure_logging()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_fragments_are_valid_python(page: Path) -> None:
    for block in python_blocks(page):
        block.compile()  # a SyntaxError names the page and line


def test_every_python_block_is_run_or_marked_a_fragment() -> None:
    runnable = [b for page in PAGES for b in python_blocks(page) if not b.is_fragment]
    fragments = [b for page in PAGES for b in python_blocks(page) if b.is_fragment]
    # Every block is one or the other by construction; what can go wrong is a block
    # the fence pattern misses (and so nothing checks): count the fences by hand.
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = len(re.findall(r"^```(?:python|py|python3)\b", text, re.MULTILINE))
        assert fences == len(python_blocks(page)), page.name
    assert len(runnable) >= 8, [f"{b.page.name}:{b.line}" for b in runnable]
    assert len(runnable) > len(fragments)


def test_the_harness_reports_the_failing_block(tmp_path: Path) -> None:
    page = tmp_path / "bad.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```python\nawait boom()\n```\n")
    found = python_blocks(page)
    assert [b.line for b in found] == [4, 8]
    namespace: dict[str, Any] = {"boom": _async_boom}
    with pytest.raises(AssertionError, match=r"bad.md, the block at line 8 failed: .*kaput"):
        _run_page(found, namespace)
    assert namespace["x"] == 1


async def _async_boom() -> None:
    raise RuntimeError("kaput")

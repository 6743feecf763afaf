"""Libraries that run in a venv of their own (Oban for Python needs Python >= 3.12).

``ensure_extra_venv`` builds ``bench/compare/.venv-<name>`` from
``requirements-<name>.txt`` with the first suitable interpreter it finds, once per
change of that file. ``RemoteLib`` stands in for such a library in run.py: schema,
producer and verify go through ``_worker.py`` subprocesses in that venv (modes
``install``, ``produce``, ``verify``); its workers are started there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _libs import Body, Lib, Producer, WorkerRun

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"
MIN_VERSION = {"oban": (3, 12)}


def venv_dir(name: str) -> Path:
    return HERE / f".venv-{name}"


def find_python(minimum: tuple[int, int]) -> str | None:
    """An interpreter >= ``minimum``: $WORKER_CORE_BENCH_PYTHON312, pythonX.Y on PATH,
    then pyenv's versions (a pyenv shim of a version that is not selected fails its
    probe and is skipped)."""
    candidates: list[str] = []
    if os.environ.get("WORKER_CORE_BENCH_PYTHON312"):
        candidates.append(os.environ["WORKER_CORE_BENCH_PYTHON312"])
    for minor in range(minimum[1], minimum[1] + 4):
        found = shutil.which(f"python3.{minor}")
        if found:
            candidates.append(found)
    home = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{home}/versions/3.1[2-9]*/bin/python3"))
    for exe in candidates:
        probe = subprocess.run(
            [exe, "-c", f"import sys; print(sys.version_info[:2] >= {minimum!r})"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return exe
    return None


def ensure_extra_venv(name: str) -> Path | None:
    """The venv's python, built or rebuilt when needed; None when no interpreter fits."""
    requirements = HERE / f"requirements-{name}.txt"
    target = venv_dir(name)
    python = target / "bin" / "python"
    stamp = target / ".bench-compare-installed"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    exe = find_python(MIN_VERSION.get(name, (3, 11)))
    if exe is None:
        return None
    print(f"setting up {target.name} with {exe} ...", flush=True)
    if not python.exists():
        subprocess.run([exe, "-m", "venv", str(target)], check=True)
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, done.args)
    stamp.write_text(wanted)
    return python


def python_for(lib: Lib) -> str:
    return str(venv_dir(lib.venv) / "bin" / "python") if lib.venv else sys.executable


def env_for(lib: Lib) -> dict[str, str] | None:
    """The environment of ``lib``'s subprocesses (None: this process's)."""
    if lib.pythonpath is None:
        return None
    paths = [lib.pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def _call(
    python: str, args: list[str], timeout: float = 600.0, env: dict[str, str] | None = None
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        python,
        str(WORKER),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(HERE),
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode != 0:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-6:])
        raise RuntimeError(f"{args[1]} {args[-1]} exited {proc.returncode}: {tail}")
    lines = out.decode().strip().splitlines()
    return dict(json.loads(lines[-1])) if lines else {}


class RemoteLib(Lib):
    """``lib`` driven through subprocesses in its own venv."""

    def __init__(self, lib: Lib) -> None:
        self.inner = lib
        self.key = lib.key
        self.label = lib.label
        self.venv = lib.venv
        self.pythonpath = lib.pythonpath
        self.python = python_for(lib)
        self.env = env_for(lib)

    def settings(self, concurrency: int, processes: int) -> str:
        return self.inner.settings(concurrency, processes)

    async def install(self, dsn: str) -> None:
        await _call(
            self.python, ["--lib", self.key, "--dsn", dsn, "--mode", "install"], env=self.env
        )

    async def verify(self, dsn: str, expected: int) -> None:
        await _call(
            self.python,
            ["--lib", self.key, "--dsn", dsn, "--expect", str(expected), "--mode", "verify"],
            env=self.env,
        )

    @contextlib.asynccontextmanager
    async def producer(self, dsn: str) -> AsyncIterator[Producer]:
        proc = await asyncio.create_subprocess_exec(
            self.python,
            str(WORKER),
            "--lib",
            self.key,
            "--dsn",
            dsn,
            "--mode",
            "produce",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(HERE),
            env=self.env,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        async def ask(command: dict[str, Any] | None, timeout: float = 600.0) -> dict[str, Any]:
            if command is not None:
                stdin.write(json.dumps(command).encode() + b"\n")
                await stdin.drain()
            line = await asyncio.wait_for(stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"{self.key} producer exited ({await proc.wait()})")
            text = line.decode().strip()
            return {} if text == "READY" else dict(json.loads(text))

        class _P(Producer):
            elapsed: float | None = None  # of the last enqueue_many, as the subprocess timed it

            async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
                # The subprocess builds the same payloads {"i": 0..n-1} itself.
                reply = await ask({"op": "many", "n": len(payloads)})
                self.elapsed = float(reply["elapsed"])
                return int(reply["added"])

            async def enqueue_one(self, payload: dict[str, Any]) -> None:
                # The subprocess stamps "t" just before its enqueue call.
                await ask({"op": "one", "i": payload["i"]})

        try:
            await ask(None, timeout=120.0)  # READY
            yield _P()
        finally:
            with contextlib.suppress(Exception):
                stdin.write(b"\n")
                await stdin.drain()
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        raise RuntimeError("a remote library's workers run as _worker.py subprocesses")

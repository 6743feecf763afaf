"""The worker-core command: every sub-command, and one clear line for every failure."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from worker_core.cli import main


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(pg_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", pg_dsn)
    monkeypatch.setenv("WORKER_CORE_DATABASE__SCHEMA", schema)
    monkeypatch.setenv("WORKER_CORE_QUEUE__NAME", "cli")
    monkeypatch.setenv("WORKER_CORE_QUEUE__POLL_INTERVAL", "0.2")

    def run(*argv: str, stdin: str = "") -> Run:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return Run(code, out.getvalue(), err.getvalue())

    return run


def test_migrate_enqueue_run_status(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = cli("migrate")
    assert first.code == 0, first.err
    assert "applied [1" in first.out
    again = cli("migrate")
    assert "is up to date" in again.out
    added = cli("enqueue", '{"doc": 1}', '{"doc": 2}')
    assert added.code == 0, added.err
    assert len(added.out.split()) == 2
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"doc": 3}\n\n{"fail": "bad input"}\n')
    assert cli("enqueue", "--file", str(lines)).code == 0
    assert cli("enqueue", "--file", "-", stdin='{"doc": 5}\n').code == 0
    ran = cli("run", "tests.integration.cli_workers:Echo", "--until-empty")
    assert ran.code == 0, ran.err
    assert json.loads(ran.out.strip().splitlines()[-1])["processed"] == 4
    status = cli("status", "--json")
    report = json.loads(status.out)
    assert report["counts"]["succeeded"] == 4
    assert report["counts"]["dead"] == 1
    assert report["recent_dead_letters"][0]["error"] == "PermanentError: refused: bad input"
    text = cli("status")
    assert "succeeded=4" in text.out
    dead = cli("dead-letters", "list")
    assert "refused: bad input" in dead.out
    dead_id = json.loads(cli("dead-letters", "list", "--json").out)[0]["id"]
    requeued = cli("dead-letters", "requeue", str(dead_id))
    assert requeued.out.strip() == "requeued 1 of 1 jobs"
    assert cli("dead-letters", "requeue", "--all").out.strip() == "requeued 0 of 0 jobs"


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["enqueue", "{not json"], "", "invalid JSON in argument 1"),
        (["enqueue", "[1, 2]"], "", "argument 1 must be a JSON object, not list"),
        (["enqueue", "--file", "-"], '{"a": 1}\n{"b": \n', "invalid JSON in stdin line 2"),
        (["enqueue"], "", "nothing to enqueue"),
        (["run", "no_such_module_xyz:Worker"], "", "cannot import 'no_such_module_xyz'"),
        (["run", "tests.integration.cli_workers:Missing"], "", "has no attribute 'Missing'"),
        (["run", "tests.integration.cli_workers:NOT_A_WORKER"], "", "is not a BaseWorker subclass"),
        (["run", "just-a-module"], "", "expected MODULE:CLASS"),
        (["--schema", "Bad-Name", "status"], "", "invalid configuration: database.schema"),
        (["dead-letters", "requeue"], "", "give job ids to requeue, or --all"),
    ],
)
def test_bad_input_gives_one_clear_line(cli, argv: list[str], stdin: str, message: str) -> None:  # type: ignore[no-untyped-def]
    assert cli("migrate").code == 0
    result = cli(*argv, stdin=stdin)
    assert result.code == 1
    assert message in result.err
    assert result.err.count("\n") == 1
    assert "Traceback" not in result.err


def test_unreachable_database_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", f"postgresql://u:hunter2x@/db?host={tmp_path}")
    monkeypatch.setenv("WORKER_CORE_DATABASE__CONNECT_TIMEOUT", "1")
    out, err = io.StringIO(), io.StringIO()
    code = main(["status"], stdout=out, stderr=err)
    assert code == 1
    assert "cannot connect to PostgreSQL" in err.getvalue()
    assert "hunter2x" not in err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_no_dsn_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKER_CORE_DATABASE__DSN", raising=False)
    err = io.StringIO()
    assert main(["migrate"], stdout=io.StringIO(), stderr=err) == 1
    assert "no database: pass --dsn" in err.getvalue()


def test_usage_errors_exit_2() -> None:
    err = io.StringIO()
    assert main(["frobnicate"], stdout=io.StringIO(), stderr=err) == 2


def test_health_command(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("migrate").code == 0
    healthy = cli("health", "--json")
    assert healthy.code == 0, healthy.err
    assert json.loads(healthy.out)["status"] == "healthy"
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", f"postgresql://u:pw77x@/db?host={tmp_path}")
    down = cli("health")
    assert down.code == 3
    assert down.out.startswith("unhealthy")
    assert "pw77x" not in down.out


def test_pause_and_resume(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("migrate").code == 0
    assert cli("pause", "docs").out == "queue 'docs' paused\n"
    assert cli("pause", "docs").out == "queue 'docs' already paused\n"
    assert cli("resume", "docs").out == "queue 'docs' resumed\n"
    assert cli("resume", "docs").out == "queue 'docs' not paused\n"
    bad = cli("pause", "a\x01b")
    assert bad.code == 1 and bad.err.count("\n") == 1 and "queue name" in bad.err


def test_dashboard_refuses_a_public_address_without_token(cli) -> None:  # type: ignore[no-untyped-def]
    refused = cli("dashboard", "--host", "0.0.0.0", "--port", "0")
    assert refused.code == 1
    assert "without dashboard.token" in refused.err and refused.err.count("\n") == 1


def test_dashboard_serves_until_sigterm(pg_dsn: str, schema: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "WORKER_CORE_DATABASE__DSN": pg_dsn,
           "WORKER_CORE_DATABASE__SCHEMA": schema}  # fmt: skip
    subprocess.run([sys.executable, "-m", "worker_core", "migrate"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    with subprocess.Popen(
        [sys.executable, "-m", "worker_core", "dashboard", "--port", "0", "--read-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("dashboard on http://127.0.0.1:") and "(read-only)" in line
            url = line.split()[2]
            with urllib.request.urlopen(url + "api/overview", timeout=10) as response:
                assert json.load(response)["queues"] == []
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

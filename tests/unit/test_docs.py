"""The generated configuration reference is current."""

from __future__ import annotations

from pathlib import Path

from worker_core.configdoc import render

DOCS = Path(__file__).parents[2] / "docs"


def test_configuration_reference_is_current() -> None:
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), "run: python -m worker_core.configdoc > docs/configuration.md"


def test_the_schedules_page_example_runs() -> None:
    import contextlib
    import io
    import re
    from datetime import UTC, datetime

    text = (DOCS / "schedules.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, {"REFERENCE": datetime(2030, 1, 1, tzinfo=UTC)})
    assert out.getvalue().splitlines() == [
        "rescan-docs ['2030-01-01T01:00:00+00:00', '2030-01-01T02:00:00+00:00']",
        "nightly-prune ['2030-01-01T01:30:00+00:00', '2030-01-02T01:30:00+00:00']",
    ]
    assert "prints `rescan-docs ['2030-01-01T01:00:00+00:00'" in text

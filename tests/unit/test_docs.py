"""The generated configuration reference is current."""

from __future__ import annotations

from pathlib import Path

from worker_core.configdoc import render

DOCS = Path(__file__).parents[2] / "docs"


def test_configuration_reference_is_current() -> None:
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), "run: python -m worker_core.configdoc > docs/configuration.md"

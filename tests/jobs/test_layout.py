"""The jobs' layout: no job package imports another job's modules; what more than one job uses
lives in jobs/common."""

from __future__ import annotations

import ast
from pathlib import Path

from support.paths import REPO_ROOT

JOBS = REPO_ROOT / "jobs"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_no_job_imports_another_jobs_modules() -> None:
    packages = sorted(path.name for path in JOBS.iterdir() if (path / "__init__.py").is_file() and path.name != "common")
    assert {"fit", "score", "shift", "update"} <= set(packages)
    crossing = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for package in packages for path in sorted((JOBS / package).rglob("*.py"))
        for module in imported_modules(path)
        if module.startswith("jobs.") and module.split(".")[1] not in (package, "common")
    ]
    assert not crossing, crossing

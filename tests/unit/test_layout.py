"""The layout's rules, checked so that they stay true (README, "Where things are").

- Serving never imports the offline side: no process that answers requests or
  applies events loads `batch`, `bench`, `demo` or `pyspark`, neither when its
  entry module is imported nor through an import inside a function.
- One name per meaning: a module or package name is used once in the tree, except
  the roles every process has (`app`, `core`, `service`, `settings`).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from inkling.config import PROJECT_ROOT

OFFLINE = ("batch", "bench", "demo", "pyspark")
PROCESS_ENTRIES = (
    "retrieval_server.app",
    "ranking_server.app",
    "events_server.app",
    "stream_worker.app",
    "stream_worker.__main__",
)
SERVING_PACKAGES = (
    "inkling",
    "retrieval_server",
    "ranking_server",
    "events_server",
    "stream_worker",
)
COMPOSITION_ROOT = PROJECT_ROOT / "inkling" / "cli.py"
FIRST_PARTY = (*SERVING_PACKAGES, "batch", "bench", "demo")
PROCESS_ROLES = {"app", "core", "service", "settings"}


def _offline(module: str) -> bool:
    return module.split(".")[0] in OFFLINE


@pytest.mark.parametrize("entry", PROCESS_ENTRIES)
def test_a_serving_process_loads_nothing_offline(entry: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({entry!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert entry in loaded
    assert [m for m in loaded if _offline(m)] == []


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an `import` or `from ... import` in the file names, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _sources(packages: tuple[str, ...]) -> list[Path]:
    return sorted(
        p
        for package in packages
        for p in (PROJECT_ROOT / package).rglob("*.py")
        if "v1" not in p.relative_to(PROJECT_ROOT).parts
    )


def test_no_serving_module_imports_the_offline_side_even_lazily() -> None:
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {module}"
        for path in _sources(SERVING_PACKAGES)
        if path != COMPOSITION_ROOT
        for line, module in _imports(path)
        if _offline(module)
    ]
    assert offenders == []


def test_the_composition_root_is_where_the_offline_side_is_wired() -> None:
    # The check above exempts the CLI; this keeps the exemption meaningful.
    assert any(_offline(module) for _, module in _imports(COMPOSITION_ROOT))


def test_one_name_per_meaning() -> None:
    homes: dict[str, list[str]] = defaultdict(list)
    for path in _sources(FIRST_PARTY):
        relative = path.relative_to(PROJECT_ROOT)
        if path.name == "__init__.py":
            if len(relative.parts) > 2:  # a subpackage: its folder is a name too
                homes[relative.parts[-2]].append(str(relative.parent))
        elif path.name != "__main__.py":
            homes[path.stem].append(str(relative))
    shared = {
        name: places
        for name, places in homes.items()
        if len(places) > 1 and name not in PROCESS_ROLES
    }
    assert shared == {}

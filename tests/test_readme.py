"""The README's "How it works" table names every module in s3cache/, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table_names(readme: str) -> set[str]:
    """The backquoted names in the first column of the table under "## How it works"."""
    section = readme.split("## How it works", 1)[1]
    rows = re.findall(r"^\| *(.+?) *\|", section.split("\n\n**", 1)[0], flags=re.M)
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row)}


def _modules() -> set[str]:
    pkg = ROOT / "s3cache"
    return {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}


def test_the_how_it_works_table_names_every_module_and_only_modules_that_exist() -> None:
    named = _table_names((ROOT / "README.md").read_text())
    modules = _modules()
    assert "daemon.py" in modules and "cli/serve.py" in modules  # the walk sees the package and its subpackages
    missing = sorted(modules - named)
    assert not missing, f"modules missing from the README's How it works table: {missing}"
    stale = sorted(n for n in named - modules if n.endswith(".py"))
    assert not stale, f"the README's How it works table names modules that do not exist: {stale}"


def test_the_check_fails_for_a_module_left_out() -> None:
    """The check can fail: a table without one row misses that module."""
    readme = (ROOT / "README.md").read_text()
    without = "\n".join(line for line in readme.split("\n") if not line.startswith("| `ops.py` |"))
    assert "ops.py" in _modules() - _table_names(without)

"""The "How it works" table names every package of s3cache/ and, in its package's row, every module;
nothing that is gone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "README.md"


def _rows(text: str) -> dict[str, set[str]]:
    """Package -> the module names in its row of the table under "## How it works". The first column
    names the package (`cli/`, or `s3cache` for the top level); the third lists its modules."""
    section = text.split("## How it works", 1)[1]
    rows = {}
    for line in section.split("\n\n**", 1)[0].split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        package = re.findall(r"`([^`]+)`", cells[0])[0].rstrip("/")
        rows[package] = set(re.findall(r"`([^`]+)`", cells[2]))
    return rows


def _has_code(path: Path) -> bool:
    """A package's ``__init__`` is a module of its own in the table only when it holds more than a docstring."""
    body = ast.parse(path.read_text()).body
    return len(body) > 1 or (len(body) == 1 and not isinstance(getattr(body[0], "value", None), ast.Constant))


def _modules() -> dict[str, set[str]]:
    """Package -> its modules, as the table names them (stems; the top level is "s3cache")."""
    pkg = ROOT / "s3cache"
    found: dict[str, set[str]] = {}
    for p in pkg.rglob("*.py"):
        if "__pycache__" in p.parts:
            continue
        rel = p.relative_to(pkg)
        package = rel.parts[0] if len(rel.parts) > 1 else "s3cache"
        if p.name != "__init__.py" or package == "s3cache" or _has_code(p):
            found.setdefault(package, set()).add(p.stem)
        else:
            found.setdefault(package, set())
    return found


def _missing_and_stale(text: str) -> tuple[list[str], list[str]]:
    rows, modules = _rows(text), _modules()
    missing = [f"{p}/{m}" for p, ms in modules.items() for m in sorted(ms - rows.get(p, set()))]
    missing += [f"{p}/" for p in modules if p not in rows]
    stale = [f"{p}/{m}" for p, ms in rows.items() for m in sorted(ms - modules.get(p, set()))]
    return sorted(missing), sorted(stale)


def test_the_how_it_works_table_names_every_package_and_module_and_only_those_that_exist() -> None:
    modules = _modules()
    assert "root" in modules["daemon"] and "serve" in modules["cli"]  # the walk sees the subpackages
    missing, stale = _missing_and_stale(DOC.read_text())
    assert not missing, f"packages or modules missing from the How it works table: {missing}"
    assert not stale, f"the How it works table names modules that do not exist: {stale}"


def test_the_check_fails_for_a_module_left_out() -> None:
    """The check can fail: a table whose daemon row lacks `ops` misses that module."""
    text = DOC.read_text()
    without = "\n".join(line.replace(", `ops`,", ",") if line.startswith("| `daemon/` |") else line
                        for line in text.split("\n"))
    assert without != text
    assert "daemon/ops" in _missing_and_stale(without)[0]

"""The documentation a reader follows: a README a newcomer reads in minutes, with docs/ beside it, every
relative link and #anchor resolving, nothing pointing outside the repository or at issue numbers, and
the reference tables (packages, options) matching the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where links are not links."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not '-' or '_'), spaces to '-'."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _FENCE.sub("", text), flags=re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links of ``text`` (the page ``page``) whose file or #anchor does not exist."""
    bad = []
    for m in _LINK.finditer(prose(text)):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target}: no such file")
            continue
        if anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text() if dest != page else text)):
            bad.append(f"{page.name}: {target}: no such heading in {dest.name}")
    return bad


def test_the_readme_is_short_and_has_a_table_of_contents():
    text = README.read_text()
    assert len(text.splitlines()) < 300
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    sections = {slug(h) for h in re.findall(r"^## (.+)$", _FENCE.sub("", text), flags=re.M)} - {"contents"}
    assert listed == sections, f"the table of contents and the sections differ: {listed ^ sections}"


def test_the_readme_links_every_document_in_docs():
    linked = {(ROOT / m.group(1).partition("#")[0]).resolve() for m in _LINK.finditer(prose(README.read_text()))
              if m.group(1).startswith("docs/")}
    assert DOCS and set(DOCS) <= linked, f"documents the README does not link: {set(DOCS) - linked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    assert not broken_links(page, page.read_text())


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "other.md").write_text("# Other\n\n## `status --json`\n\n## Security: who can do what\n")
    text = ("[a](other.md#status---json) [b](other.md#security-who-can-do-what) [c](#here)\n\n## Here\n\n"
            "[d](missing.md) [e](other.md#nope) [f](#nowhere) `[g](ignored.md)` [h](https://example.com/x)\n")
    page.write_text(text)
    assert broken_links(page, text) == ["p.md: missing.md: no such file", "p.md: other.md#nope: no such heading in other.md",
                                        "p.md: #nowhere: no such heading in p.md"]


SHIPPED = [*PAGES, ROOT / "pyproject.toml", *sorted((ROOT / "deploy").rglob("*")), *sorted((ROOT / "systemd").glob("*"))]


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.is_file()], ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_points_outside_the_repository_or_at_issue_numbers(path):
    text = path.read_text()
    assert "../shared" not in text and "MEASURED-HERE" not in text
    assert not re.search(r"\bissues?\s+#?\d+", text, flags=re.I), re.search(r".{0,40}\bissues?\s+#?\d+.{0,20}", text, re.I)
    # that name on the package index is another project: only ever mentioned to say so
    told = [line for line in text.splitlines() if "pip install s3cache" in line and not re.search(r"never|unrelated", line, re.I)]
    assert not told, told


def _package_rows() -> dict[str, set[str]]:
    """Package -> module names of the package table in docs/how-it-works.md ("The packages")."""
    text = (ROOT / "docs" / "how-it-works.md").read_text()
    table = text.split("## The packages", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        package = re.match(r"`([^`]+)`", cells[0]).group(1).rstrip("/")
        rows[package] = set(re.findall(r"`([^`]+)`", cells[2]))
    return rows


def test_the_package_table_names_every_package_and_every_module_in_it():
    rows = _package_rows()
    pkg = ROOT / "s3cache"
    packages = {"s3cache": pkg, **{d.name: d for d in pkg.iterdir() if (d / "__init__.py").exists()}}
    assert rows.keys() == packages.keys(), f"packages and table rows differ: {rows.keys() ^ packages.keys()}"
    for name, d in packages.items():
        modules = {p.stem for p in d.glob("*.py")} - {"__init__", "__main__"}
        named = rows[name] - {"__init__", "__main__"}
        assert named == modules, f"{name}: missing from the table {modules - named}, gone {named - modules}"


def test_the_configuration_reference_names_every_option():
    from s3cache.service.config import options

    text = (ROOT / "docs" / "configuration.md").read_text()
    for o in options():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{o.flag}` |")), None)
        assert row is not None, f"{o.flag} is not in docs/configuration.md"
        assert all(f"`{e}`" in row for e in o.env) and f"`{o.name}`" in row, row


def test_the_quickstart_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    assert command in README.read_text() and command in ci


def test_every_test_the_docs_cite_exists():
    """The docs name tests as evidence (`tests/test_x.py::test_y`, `::test_z` after one): each must exist."""
    defined = {m.group(1) for p in (ROOT / "tests").glob("test_*.py")
               for m in re.finditer(r"^(?:async )?def (test_\w+)", p.read_text(), flags=re.M)}
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    for page in PAGES:
        text = page.read_text()
        for name in re.findall(r"\b(test_\w+\.py)\b", text):
            assert name in files, f"{page.name} cites {name}, which does not exist"
        for name in re.findall(r"::\s*(test_\w+)", text):
            assert name in defined, f"{page.name} cites {name}, which is no test"

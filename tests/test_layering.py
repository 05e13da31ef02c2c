"""The import layering is a contract (pyproject.toml, [tool.importlinter]) that lint-imports checks.

The packages import one way (cli, daemon, sockets, reader | fetch, service | store | policy, manifest,
errors); inside the daemon, its parts import one way (root -> ops/reload/status ->
readers/maintenance/workers/manifest_watch -> schedule/publisher/recovery -> space); the library never
imports click or tensorflow (only the cli package and tf do); what readers load never imports boto3;
production code never imports the test harness.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import s3cache

ROOT = Path(__file__).resolve().parent.parent
HARNESS = "s3cache.testing"


def _lint_imports(where: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run([*cmd, "--no-cache", "--config", str(where / "pyproject.toml")], cwd=where,
                          env=env, capture_output=True, text=True, timeout=120)


def _contracts() -> dict[str, dict]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    return {c["name"]: c for c in config["tool"]["importlinter"]["contracts"]}


def _production_modules() -> set[str]:
    names = {"s3cache"}
    for m in pkgutil.walk_packages(s3cache.__path__, "s3cache."):
        if m.name != HARNESS and not m.name.startswith(HARNESS + "."):
            names.add(m.name)
    return names


def test_the_import_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_forbidden_contracts_list_every_production_module() -> None:
    """A module added later is covered, or this names it."""
    production = _production_modules()
    contracts = _contracts()
    no_click = set(contracts["The library never imports click or tensorflow (only the cli package and tf.py do)"]
                   ["source_modules"])
    cli = {m for m in production if m == "s3cache.cli" or m.startswith("s3cache.cli.")}
    assert "s3cache.cli.serve" in cli  # the command package is walked, so the exclusion below is not vacuous
    assert no_click == production - cli - {"s3cache.tf", "s3cache.__main__"}
    no_harness = set(contracts["Production modules never import the test harness"]["source_modules"])
    assert no_harness == production
    readers = set(contracts["What readers load never imports boto3 or botocore"]["source_modules"])
    assert readers == {"s3cache", "s3cache.tf"} | {m for m in production if m.startswith("s3cache.reader")}


def test_every_module_lives_in_a_package_that_is_a_layer() -> None:
    """The tree is the map: no module is added beside the packages without taking a place in the layers."""
    layers = _contracts()["The packages import one way: the CLI on top, the manifest and the errors at the bottom"]
    named = {part.strip() for layer in layers["layers"] for part in layer.split("|")}
    top = {".".join(m.split(".")[:2]) for m in _production_modules() if m != "s3cache"}
    assert top - named == {"s3cache.__main__"}


def test_an_upward_or_forbidden_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The check can fail: a copy of the package with a part importing the daemon's root, the store
    importing the sockets, readers' code importing boto3, and the space importing the harness."""
    shutil.copytree(ROOT / "s3cache", tmp_path / "s3cache", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "s3cache" / "daemon" / "space.py", "a") as f:
        f.write("\nfrom .root import Daemon  # noqa\nfrom s3cache.testing import MotoServer  # noqa\n")
    with open(tmp_path / "s3cache" / "store" / "files.py", "a") as f:
        f.write("\nfrom s3cache.sockets.control import Server  # noqa\n")
    with open(tmp_path / "s3cache" / "reader" / "wire.py", "a") as f:
        f.write("\nimport botocore  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    out = result.stdout
    assert "s3cache.daemon.space is not allowed to import s3cache.daemon.root" in out, out
    assert "s3cache.store is not allowed to import s3cache.sockets" in out, out
    assert "s3cache.reader.wire is not allowed to import botocore" in out, out
    assert "s3cache.daemon.space is not allowed to import s3cache.testing" in out, out

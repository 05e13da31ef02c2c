"""Environments for the baselines that cannot share ours, made on demand.

    python -m bench.envs [--dir bench/.venvs] [fsspec] [tfio]

* ``fsspec``: s3fs + TensorFlow. s3fs pins aiobotocore, which pins an older botocore than the one
  s3cache's boto3 wants, so it gets a venv of its own (s3fs is named first so that pip's resolver
  starts from it instead of walking back through years of aiobotocore releases).
* ``tfio``: tensorflow-cpu 2.16.2 + tensorflow-io 0.37.1, the last pair that works together.

Each takes a minute or two and ~1.5 GB. ``python -m bench`` runs a baseline when its environment is
there and reports it as not run otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import venv
from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / ".venvs"
PACKAGES = {
    "fsspec": ["s3fs", "tensorflow-cpu"],
    "tfio": ["tensorflow-cpu==2.16.2", "tensorflow-io==0.37.1"],
}


def python_of(name: str, root: Path = DEFAULT_DIR) -> Path | None:
    """The interpreter of a finished environment, or None if it was never (completely) made."""
    env = root / name
    return env / "bin" / "python" if (env / ".complete").exists() else None


def create(name: str, root: Path = DEFAULT_DIR) -> Path:
    env = root / name
    venv.create(env, with_pip=True, clear=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "--quiet", *PACKAGES[name]], check=True)
    (env / ".complete").touch()  # only now: an interrupted install is not mistaken for a usable one
    return env / "bin" / "python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {', '.join(PACKAGES)} (default: all)")
    a = ap.parse_args()
    unknown = [n for n in a.names if n not in PACKAGES]
    if unknown:
        ap.error(f"no environment named {unknown[0]!r}; known: {', '.join(PACKAGES)}")
    for name in a.names or PACKAGES:
        print(f"making {a.dir / name} ({' '.join(PACKAGES[name])})", flush=True)
        create(name, a.dir)


if __name__ == "__main__":
    main()

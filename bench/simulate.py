"""Hit rates of plain LRU, s3cache's policy and Belady's optimum on replayed traces.

    python -m bench.simulate [--files 200] [--cache 100] [--epochs 4] [--window 2] [--lease 600]
"""

import argparse

from s3cache.policy.simulate import markdown, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--cache", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--lease", type=float, default=600.0, help="seconds; a reader reads a file a second")
    a = ap.parse_args()
    print("Hit rate = 1 - GETs / accesses, after the first epoch (what the S3 bill sees).")
    print(markdown(table(a.files, a.cache, a.epochs, a.window, a.lease)))


if __name__ == "__main__":
    main()

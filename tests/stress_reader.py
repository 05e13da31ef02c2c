"""One reader process of the lease stress test: resolve random files, open each at once, and re-open
the previous one while it is still within its lease. Prints a JSON summary ("late": re-opens not tried
because this reader came back after half the lease, so the test can tell it never tested anything);
exit 1 on any miss."""

import json
import random
import sys
import time

from s3cache import resolve


def main() -> None:
    cache_dir, bucket, n, count, lease, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5]), int(sys.argv[6])
    rng = random.Random(seed)
    errors, reopened, late = [], 0, 0
    prev = None
    for _ in range(count):
        i = rng.randrange(n)
        path = resolve(f"s3://{bucket}/s/{i:03d}", cache_dir=cache_dir, timeout=120)
        got = time.monotonic()
        try:
            with open(path, "rb") as f:
                if f.read(4) != i.to_bytes(4, "big"):
                    errors.append(f"wrong bytes in {path}")
        except FileNotFoundError:
            errors.append(f"FileNotFoundError right after resolve: {path}")
        if prev is not None and time.monotonic() - prev[1] < lease * 0.5:
            try:
                open(prev[0], "rb").close()
                reopened += 1
            except FileNotFoundError:
                errors.append(f"FileNotFoundError within the lease: {prev[0]}")
        elif prev is not None:
            late += 1
        prev = (path, got)
    print(json.dumps({"errors": errors, "reopened": reopened, "late": late}))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

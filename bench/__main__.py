"""``python -m bench`` (from the repository root or with it on PYTHONPATH), or ``python path/to/bench``
from any directory."""

if not __package__:  # run as a directory: make the repository importable, as -m would
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.compare import main
else:
    from .compare import main

main()

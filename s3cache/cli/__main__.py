"""``python -m s3cache.cli``: the same as the ``s3cache`` command."""

from . import main

main()

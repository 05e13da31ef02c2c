"""The ``s3cache`` command: a thin click shell over the library, one module per command group.

Every S3CacheError becomes one line on stderr and its exit code (EXIT_CODES: 2 for bad input, as click's
usage errors, 1 otherwise); only a bug prints a traceback. The modules:

* ``common``   — the ``main`` group, exit codes, ``--cache-dir``, asking the daemon;
* ``serve``    — ``serve`` and ``config show`` (the settings table as flags, logging);
* ``status``   — ``status`` (``--json``, ``--watch``);
* ``objects``  — ``resolve``, ``pin``, ``unpin``, ``verify``;
* ``manifest`` — ``manifest`` (list a prefix);
* ``demo``     — ``demo`` (the only one that loads the test harness).

``s3cache.cli:main`` is the console script. Only this package imports click; the library never does.
"""

from __future__ import annotations

from . import demo, manifest, objects, serve, status  # noqa: F401  (each adds its commands to main)
from .common import BAD_INPUT, EXIT_CODES, exit_code, main
from .objects import PIN_OUTCOMES, pin_report

__all__ = ["BAD_INPUT", "EXIT_CODES", "PIN_OUTCOMES", "exit_code", "main", "pin_report"]

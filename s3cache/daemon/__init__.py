"""The daemon: the composition root (``root``) and its parts, each with one job.

``space`` (+ ``pins``, ``room``): the resident set, reservations, admission and eviction.
``schedule`` (+ ``demand``, ``failures``): what to fetch next and why. ``readers`` (+ ``announce``):
usage notes, wants, waiters and leases. ``publisher``: verified temp files become cached files.
``workers``: one fetch at a time each. ``maintenance``, ``recovery``: verify, and make the index and
the disk agree at start. ``manifest_watch``, ``reload``: the manifest in force and SIGHUP. ``status``,
``ops``: what the daemon reports and the control socket's requests. ``supervise``: loops that outlive
their errors.

Invariants: parts import one way (root, then ops/reload/status, then readers/maintenance/workers/
manifest_watch, then schedule/publisher/recovery, then space), checked by import-linter; one state lock
is shared by the space, schedule, readers and publisher; ready plus reserved bytes never exceed the
bound; no reader sees a partial or unverified file, at any instant, across any crash.
"""

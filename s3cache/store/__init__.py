"""The cache dir on disk: where each object lives (``paths``, ``layout``), whether the dir may be
trusted (``trust``, ``tree``), taking it (``cachedir``), the durable index (``index``), and temp files,
publishing, removal and quarantine (``files``).

Invariants: no file is ever written outside the cache dir (every path is a pure function of bucket and
key, reached through directory descriptors that never follow a symlink); a file is published by rename
after its bytes and its directory are fsync'd, and its index row is written after the rename and
removed after the file; private state is reachable by the daemon's group at most. Nothing here talks
to S3.
"""

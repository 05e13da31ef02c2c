"""One object from S3 into a verified, fsync'd temp file: the requests (``s3api``), the link's
connections and its priority (``link``), the byte layout of ranged GETs (``parts``), streaming to disk
(``stream``), re-splitting a download a reader starts waiting on (``resplit``), retries (``retry``), which checks an object is held to (``checks``, ``verifier``), the
checksums themselves (``checksum``, ``partdigest``), writing a manifest from a listing
(``listing``), and a manifest's URI list, prefix lines listed, for training code (``uris``).

Invariants: a temp file handed on has matched every check S3 or the manifest states (or the object is
known to have none, and is said so); memory stays flat whatever the object size; nothing here knows
the cache dir's layout or eviction.
"""

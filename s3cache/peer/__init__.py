"""The peer tier: hosts of one fleet serve each other verified files, so an object leaves S3 once.

``owners`` (which host owns an object: rendezvous hashing over fixed slots), ``members`` (the host
list from a list, a file, TF_CONFIG or DNS, and which peers this host has marked out for a while),
``signing`` (requests signed with a shared secret), ``server`` (the HTTP listener that serves this
host's published files to peers), ``client`` (one object from a peer into a verified temp file) and
``source`` (the seam the workers fetch through: the owner first, then S3).

Invariants: nothing a peer sends is trusted: its bytes are checked against the manifest's or S3's
strongest checksum as S3's bytes are, and a peer's bad bytes never make an object's failure permanent
(the peer is marked out and the object comes from S3); a file is served only if it is published, found
through the index by its URI and in this host's manifest, never through a path built from the request;
a fetch waits on a peer's first byte at most ``--peer-timeout``, and on the whole transfer at most
that plus twice what S3 takes for the size on this host, before it goes to S3.
"""

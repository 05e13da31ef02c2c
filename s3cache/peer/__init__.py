"""The peer tier: hosts of one fleet serve each other verified files, so an object leaves S3 once.

``owners`` (which host owns an object: the ``--shard`` rule over manifest positions, or rendezvous
hashing over fixed slots), ``members`` (the host list, and which peers this host has marked out for a
while), ``signing`` (requests signed with a shared secret), ``server`` (the HTTP listener that serves
this host's published files to peers), ``client`` (one object from a peer into a verified temp file) and
``source`` (the seam the workers fetch through: the owner first, then S3).

Invariants: nothing a peer sends is trusted: its bytes are checked against the manifest's or S3's
checksum as S3's bytes are, and a peer's bad bytes never make an object's failure permanent (the peer
is marked out and the object comes from S3); a file is served only if it is published, found through
the index by its URI and in this host's manifest, never through a path built from the request; a
fetch waits on a peer at most ``--peer-timeout`` before it goes to S3.
"""

"""What a training process loads: ``resolve()``, the readers' client of the daemon's two sockets, the
wire format they share with the daemon, the cache's lease lock, and a data loader worker's share of a
file list (``workers``).

Invariants: nothing here imports boto3, botocore, click or TensorFlow (readers start fast and never pay
for the daemon's dependencies); a path returned is one the daemon published after verifying it, inside
the cache dir; every blocking call is bounded by the caller's deadline.
"""

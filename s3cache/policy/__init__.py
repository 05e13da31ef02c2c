"""Pure decisions: which files to evict and where readers are (``evict``), which files readers' leases
protect (``leases``), deterministic shuffled orders (``order``), and a simulator that replays traces
against LRU, s3cache's policy and Belady's optimum (``simulate``).

Invariants: no I/O and no clock of their own (time is passed in), so every rule is tested as a pure
function; with readers in manifest order or an announced order, eviction is Belady's rule.
"""

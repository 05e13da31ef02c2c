"""The manifest: the identity of an object (``refs``), parsing one line at a time (``parse``), reading
a whole file (``file``), the compact in-memory list (``catalog``), jobs of a manifest directory
(``jobs``), this host's share (``shard``) and what a reader may ask for (``scope``).

Invariants: pure but for reading the manifest file itself; a file is installed whole or not at all;
every error names the file, the line and the key.
"""

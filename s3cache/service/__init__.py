"""What running as a service needs: settings validated once at the edge (``config``, ``kinds``, and
where each comes from, ``config_sources``), systemd's notify protocol (``notify``), Prometheus metrics
(``metrics``) and the live progress view of ``status --watch`` (``progress``).

Invariants: no credential is ever printed (URLs are redacted); these modules hold no daemon state.
"""

"""Jobs: edits that outlive a connection (and, with ``--state-dir``, a restart), with signed webhooks.

:mod:`.config` (flags), :mod:`.state` (the state directory: lock, SQLite, result files, saved inversions),
:mod:`.manager` (the queue over the runner), :mod:`.webhooks` (signed delivery), :mod:`.service` (gRPC
methods) and :mod:`.routes` (HTTP routes).
"""

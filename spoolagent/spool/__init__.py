"""Spool: the on-disk queue of batches (SQLite through persist-queue).

``queue`` is the live queue the agent uses (the only importer of persistqueue), ``format`` the row
format and schema, ``file`` read-only and repair access for the CLI, ``salvage`` damaged files,
``writer`` the thread that commits the batchers' batches, ``_pq`` what is taken from persist-queue,
``bound`` max_bytes and when_full, ``ready`` waking idle getters, ``lock`` one agent per state dir.
"""

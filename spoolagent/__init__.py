"""spoolagent: run collectors, spool what they print in SQLite, ship it in acknowledged batches."""

__version__ = "0.1.0"

"""spoolcore: the little both programs need -- log formatting, SQLite transactions, size/duration
parsing, token files, pids and atomic JSON files.

Standard library only, and it imports neither ``spoolagent`` nor ``receiver`` (the layering test
checks), so the receiver still installs and runs without the agent's dependencies. Keep each
module small; what only one program needs lives in that program.
"""

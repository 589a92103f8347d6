"""The command line: argument parsing, printing and exit codes for ``spoolagent``.

``commands`` is the entry point (``run``, ``check``, ``status``, ``collectors``), ``spool`` the spool
subcommands, ``demo`` the embedded receiver + agent of the README's first command.
"""

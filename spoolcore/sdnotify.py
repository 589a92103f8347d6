"""systemd readiness without a dependency: ``notify("READY=1")`` over ``$NOTIFY_SOCKET``.

The protocol of sd_notify(3): one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Outside systemd (no variable) it
does nothing. It reads the environment itself, as libsystemd's sd_notify does: the variable is
systemd's contract with the process, not a setting. Standard library only.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, *, socket_path: str | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``); True if a socket took it. Never
    raises: readiness is advisory, and a failure must not stop the program."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True

"""Checks of a loaded config against this host, run by ``spoolagent check`` and before ``run``:
what ``config.load`` cannot know from the file alone and ``run`` used to find out with a traceback.

- ``[agent] state_dir`` on a virtual filesystem (``/proc``, ``/sys``, ``/dev``...): it can never
  hold the spool (``mkdir`` fails there even as root);
- ``[status] listen`` taken by another process (the running agent's own port is fine).

Reads ``/proc/self/mounts`` and binds a socket for a moment; changes nothing. Imports config and
runtime.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from spoolagent import config, runtime

_VIRTUAL_FS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs",
                         "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl",
                         "mqueue", "hugetlbfs", "binfmt_misc", "efivarfs", "autofs"})


def _fs_type(path: Path) -> str | None:
    """The filesystem type of the mount that holds ``path`` (its nearest existing ancestor)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(next((p for p in (path, *path.parents) if p.exists()), path))
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _port_problem(cfg: config.AgentConfig) -> str | None:
    listen = cfg.status.listen
    host, _, port = listen.rpartition(":")
    if not listen or int(port) == 0:
        return None
    try:
        with socket.create_server((host.strip("[]"), int(port))):
            return None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return f"[status] listen: cannot listen on {listen}: {exc.strerror or exc}"
    try:  # in use by this config's own running agent: that is no problem
        url = str(runtime.read(cfg.agent.state_dir).get("status_url") or "")
    except (OSError, ValueError):
        url = ""
    if url.endswith(f":{port}"):
        return None
    return f"[status] listen: {listen} is in use by another process (set another port, or \"\" to switch it off)"


def problems(cfg: config.AgentConfig) -> list[str]:
    """What keeps this config from running here, one line each (empty: nothing found)."""
    found = []
    kind = _fs_type(cfg.agent.state_dir)
    if kind in _VIRTUAL_FS:
        found.append(f"[agent] state_dir: {cfg.agent.state_dir} is on a {kind} filesystem, which "
                     "cannot hold files; use a directory on a disk (/var/lib/spoolagent)")
    port = _port_problem(cfg)
    if port:
        found.append(port)
    return found

"""Apply a scan of ``collectors_dir`` to the supervisor's records: new, changed, removed collectors.

A collector's file (path, interval, inode/size/mtime) and its settings (as JSON) decide whether it
changed. A change restarts a running collector (or disables it: ``enabled = false``); a removed
file stops it and forgets it once its run is over. Called on the supervisor thread under its lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from spoolagent.collect.discovery import Found, instances
from spoolagent.collect.states import After, Backoff, Collector, CollectorState, change_state

log = logging.getLogger(__name__)


def _enabled(settings: Mapping[str, Any]) -> bool:
    return settings.get("enabled", True) is not False


def apply_scan(collectors: dict[str, Collector], found: list[Found],
               settings: Mapping[str, Mapping[str, Any]], now: float, *, backoff: Backoff,
               terminate: Callable[[Collector, float], bool]) -> None:
    """Update ``collectors`` in place from ``found`` (and the instances ``use`` makes of them);
    ``terminate`` SIGTERMs a run."""
    found = found + instances(found, settings)
    seen: set[str] = set()
    for f in found:
        seen.add(f.name)
        mine = settings.get(f.name, {})
        config_json = json.dumps(mine, sort_keys=True, default=str)
        enabled = _enabled(mine)
        c = collectors.get(f.name)
        if c is None:
            c = Collector(f.name, f.path, f.interval_s, f.ident, config_json, enabled,
                          backoff.initial_s, next_start=now,
                          state=CollectorState.WAITING if enabled else CollectorState.DISABLED)
            collectors[f.name] = c
            log.info("collector found name=%s interval_s=%d path=%s enabled=%s",
                     f.name, f.interval_s, f.path, enabled)
            continue
        changed = ((f.path, f.interval_s, f.ident, config_json)
                   != (c.path, c.interval_s, c.ident, c.config_json))
        c.path, c.interval_s, c.ident, c.config_json = (f.path, f.interval_s, f.ident,
                                                        config_json)
        c.enabled = enabled
        if c.after_run is After.REMOVE:  # removed and put back before its run was over
            c.after_run = After.RESTART if enabled else After.DISABLE
        if not changed:
            continue
        log.info("collector changed name=%s interval_s=%d enabled=%s", f.name,
                 f.interval_s, enabled)
        if c.run is not None:
            c.request(After.RESTART if enabled else After.DISABLE)
            terminate(c, now)
        elif enabled:
            change_state(c, CollectorState.WAITING, next_start=now)
            backoff.reset(c)
        else:
            change_state(c, CollectorState.DISABLED)
    for name in [n for n in collectors if n not in seen]:
        c = collectors[name]
        if c.run is None:
            del collectors[name]
            log.info("collector removed name=%s", name)
        elif c.after_run is not After.REMOVE:
            log.info("collector removed name=%s; stopping pid=%d", name, c.run.pid)
            c.request(After.REMOVE)
            terminate(c, now)


def copy_settings(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The supervisor's own copy of the [collectors.NAME] tables (the caller may change theirs)."""
    return {str(name): dict(table) for name, table in settings.items()}

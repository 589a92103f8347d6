"""The typed snapshot: /status keeps its JSON shape (the CLI and operators' scripts read it)."""

from __future__ import annotations

import json

from spoolagent.snapshot import AgentInfo, LineCounts, Snapshot, SpoolCorrupt


def test_status_document_shape() -> None:
    s = Snapshot(
        agent=AgentInfo(id="a", pid=1, version="0", started_s=1.0, uptime_s=2.0, state="running",
                        state_dir="/s", collectors_dir="/c"),
        collectors=[{"name": "tail", "state": "running", "lines_spooled": 3}],
        spool={"ready_batches": 1}, sender={"state": "idle"},
        lines=LineCounts(read=5, spooled=3, checkpoints=1, invalid=1, rejected=1, unprotected=0, discarded=0),
        batches_spooled=1, supervisor={"restarts_total": 0}, spool_errors=0,
        spool_corrupt=SpoolCorrupt(moved_total=0, moved_to=None, kept_files=[]),
        last_error=None, last_error_s=None, restart_needed=[])
    doc = json.loads(json.dumps(s.to_json()))
    assert set(doc) == {"agent", "collectors", "spool", "sender", "lines", "batches", "supervisor",
                        "spool_errors", "spool_corrupt", "last_error", "last_error_s", "restart_needed"}
    assert doc["batches"] == {"spooled": 1}
    assert doc["lines"]["read"] == 5 and doc["agent"]["id"] == "a"
    assert doc["spool_corrupt"] == {"moved_total": 0, "moved_to": None, "kept_files": []}

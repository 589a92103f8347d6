"""SIGHUP re-reads the token file (rotation without a restart), in one process and across workers."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ReceiverProc, wait_until


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sighup_rotates_the_token(receiver_factory: Callable[..., ReceiverProc], tmp_path: Path,
                                  processes: str) -> None:
    token = tmp_path / "token"
    token.write_text("old-secret\n")
    r = receiver_factory("--token-file", str(token), "--processes", processes)

    def status(tok: str, n: int) -> int:
        return httpx.put(f"{r.url}/v1/batches/b{n}", content=b"app 2026-11-26 x\n",
                         headers={"Authorization": f"Bearer {tok}"}, timeout=5).status_code

    assert status("old-secret", 1) == 201
    token.write_text("new-secret\n")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)  # the parent only: it passes the signal on to its workers
    # every worker has re-read it once new works and old is refused on several connections
    wait_until(lambda: all(status("new-secret", 100 + i) in (200, 201) for i in range(6)), 10)
    assert all(status("old-secret", 200 + i) == 401 for i in range(6))
    # an unreadable token file keeps the current token and the receiver running
    token.write_text("")
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed" in r.log_text(), 10)
    assert status("new-secret", 300) == 201
    assert r.proc.poll() is None

"""Issue 4 end to end: a writer produces 1,000,000 sequence-numbered lines through rename and
copytruncate rotations; the real tail collector under a real agent ships them to a real receiver
while the agent (and with it the tailer) is SIGKILLed at random moments. Every line must arrive
in the receiver's file exactly once."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.collectors.test_tail import LINE_BYTES, WRITER
from tests.conftest import AgentProc, ReceiverProc, count_lines

TOTAL = int(os.environ.get("E2E_TAIL_LINES", "1000000"))
SEED = int(os.environ.get("E2E_TAIL_SEED", "11"))


def _verify(data_dir: Path, total: int) -> tuple[list[int], list[int], int]:
    counts = bytearray(total)
    bad = 0
    for p in data_dir.glob("app_*.dat"):
        for line in p.read_bytes().splitlines():
            if line[:4] != b"seq=":
                bad += 1
                continue
            i = int(line[4:13])
            counts[i] = min(255, counts[i] + 1)
    missing = [i for i in range(total) if counts[i] == 0]
    dups = [i for i in range(total) if counts[i] > 1]
    return missing, dups, bad


@pytest.mark.timeout(600)
def test_million_lines_through_rotations_and_agent_kills_exactly_once(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    a = agent_factory([receiver.url], batch="max_wait_ms = 100", sender='compression = "zstd"',
                      extra_toml=f'[collectors.tail]\npaths = ["{logs}/app.log"]\nprod = "app"\n'
                                 'rotate_wait_s = 1.0\n')
    # the bundled tail collector, as installed: the agent runs collectors_dir/0/tail.py
    tail_src = Path(__file__).resolve().parents[2] / "collectors" / "0" / "tail.py"
    a.add_collector("tail.py", tail_src.read_text())
    a.start()
    (tmp_path / "writer.py").write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(logs), str(TOTAL),
                               str(max(TOTAL // 10, 1000)), str(LINE_BYTES)])
    rng = random.Random(SEED)
    kills, started = 0, time.monotonic()
    next_kill = time.monotonic() + rng.uniform(0.3, 2.0)
    deadline = time.monotonic() + 500
    try:
        while time.monotonic() < deadline:
            request = logs / "ct_request"
            if request.exists() and count_lines(receiver.data_dir) >= int(request.read_text()):
                # everything written before the truncation is stored: let the copytruncate happen
                request.unlink()
                (logs / "ct_go").write_text("")
            if writer.poll() is not None and count_lines(receiver.data_dir) >= TOTAL:
                break
            if time.monotonic() >= next_kill and writer.poll() is None and kills < 12:
                a.kill()  # the agent; its collectors die with it (parent-death signal)
                kills += 1
                a.start()
                next_kill = time.monotonic() + rng.uniform(0.3, 2.0)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        if writer.poll() is None:
            writer.kill()
    missing, dups, bad = _verify(receiver.data_dir, TOTAL)
    print(f"tail e2e: {TOTAL} lines, {kills} agent kills, {elapsed:.1f}s, "
          f"{TOTAL / elapsed:.0f} lines/s with kills")
    assert not bad
    assert not missing, f"{len(missing)} lines lost, first {missing[:5]}; agent log: {a.log_text()[-3000:]}"
    assert not dups, f"{len(dups)} lines twice, first {dups[:5]}"
    assert kills >= 3
    assert a.stop() == 0

"""A workload for the reliability scenarios: which sources an agent runs, what they wrote, when
everything has arrived. Builds on ``checker`` (line format, writers, verifier) and the shared
``tests.conftest`` processes.

    w = Workload(tmp_path / "w")
    w.ckpt("ck", 20_000); w.raw("rw", 20_000); w.tail("tl-a", 20_000, rotate_every=5_000)
    a = agent_factory([url], extra_toml=w.toml()); w.install(a); a.start(); w.start()
    ... faults ...
    w.settle(a, data_dir); w.verify(data_dir).assert_exactly_once("ck", "tl-a")

``SPOOLAGENT_LONG=1`` in the environment selects the long variants (``scale()``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from spoolagent.collect import process as procs
from spoolagent.spool.writer import SLOTS
from tests.conftest import ROOT, AgentProc, wait_until
from tests.reliability.checker import CKPT, RAW, Report, TailWriter, raw_written, received, verify

LONG = os.environ.get("SPOOLAGENT_LONG", "") not in ("", "0")
TAIL_SOURCE = (ROOT / "collectors" / "0" / "tail.py").read_text()


def scale(short: int, long: int) -> int:
    return long if LONG else short


class Workload:
    """Sources of one agent: checkpointing (CKPT), raw (RAW) collectors and tailed files."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.tables: dict[str, dict[str, Any]] = {}
        self.programs: dict[str, str] = {}
        self.ckpts: dict[str, int] = {}
        self.raws: dict[str, tuple[Path, int]] = {}
        self.writers: dict[str, TailWriter] = {}
        self.tail_dir = base / "logs"

    def ckpt(self, src: str, total: int, *, every: int = 100, delay: float = 0.0, pad: int = 24,
             prod: str = "") -> None:
        self.tables[src] = {"total": total, "every": every, "delay": delay, "pad": pad, "src": src,
                            "prod": prod or src}
        self.programs[f"{src}.py"] = CKPT
        self.ckpts[src] = total

    def raw(self, src: str, total: int, *, chunk: int = 50, delay: float = 0.0, pad: int = 24,
            prod: str = "") -> None:
        state = self.base / f"{src}.state"
        self.tables[src] = {"format": "raw", "prod": prod or src, "src": src, "state": str(state), "total": total,
                            "chunk": chunk, "delay": delay, "pad": pad}
        self.programs[f"{src}.py"] = RAW
        self.raws[src] = (state, total)

    def tail(self, src: str, total: int, *, rate: float = 2000.0, rotate_every: int = 0,
             chunk: int = 20, glob: str = "*.log*") -> None:
        """A tailed file. Rotated names (``src.log.N``) stay inside the default glob: a file
        renamed out of the glob before the collector ever checkpointed it is not found after a
        restart (see docs/reliability.md, test_tail_limits.py)."""
        self.writers[src] = TailWriter(self.tail_dir / f"{src}.log", src, total, rate=rate,
                                       rotate_every=rotate_every, chunk=chunk)
        self.tables["tail"] = {"paths": [str(self.tail_dir / glob)], "prod": "tl",
                               "rotate_wait_s": 1, "glob_interval_s": 0.2}
        self.programs["tail.py"] = TAIL_SOURCE

    def toml(self) -> str:
        out = []
        for name, table in self.tables.items():
            out.append(f"[collectors.{json.dumps(name)}]")
            out.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
            out.append("")
        return "\n".join(out)

    def install(self, agent: AgentProc) -> None:
        self.tail_dir.mkdir(parents=True, exist_ok=True)
        for name, source in self.programs.items():
            agent.add_collector(name, source)

    def start(self) -> None:
        for w in self.writers.values():
            w.start()

    def stop(self) -> None:
        for w in self.writers.values():
            w.stop()

    def written(self) -> dict[str, int]:
        """Lines each source has produced so far."""
        out = dict(self.ckpts)
        out.update({src: raw_written(state) for src, (state, _) in self.raws.items()})
        out.update({src: w.written for src, w in self.writers.items()})
        return out

    def finished(self) -> bool:
        return (all(raw_written(state) >= total for state, total in self.raws.values())
                and all(w.done() for w in self.writers.values()))

    def received(self, data_dir: Path) -> int:
        return sum(received(data_dir, src) for src in self.written())

    def settle(self, agents: AgentProc | list[AgentProc], data_dir: Path, timeout_s: float = 90.0) -> None:
        """Wait until every writer is done, the checkpointing sources are complete, and each
        agent's spool and batchers are empty (raw lines lost in a kill never arrive)."""
        agents = agents if isinstance(agents, list) else [agents]
        wait_until(self.finished, timeout_s, interval_s=0.1, what="writers finished")
        exact = {src: n for src, n in self.written().items() if src not in self.raws}
        wait_until(lambda: all(received(data_dir, s) >= n for s, n in exact.items()), timeout_s,
                   interval_s=0.2, what=f"checkpointing sources complete {exact}")

        def drained() -> bool:
            for a in agents:
                st = a.get_status()
                if st["spool"]["ready_batches"] or st["spool"]["inflight_batches"]:
                    return False
                if any(c.get("lines_pending") for c in st["collectors"]):
                    return False
            return True

        wait_until(drained, timeout_s, interval_s=0.2, what="spools drained")
        # stable: nothing more arrives for a moment (a last ack racing the status read)
        last = [-1]

        def stable() -> bool:
            n = self.received(data_dir)
            same, last[0] = n == last[0], n
            return same

        wait_until(stable, 10, interval_s=0.3, what="received count stable")

    def verify(self, data_dir: Path) -> Report:
        return verify(data_dir, self.written())


# the agent grows each collector's stdout pipe (spoolagent/collect/process.py, _grow_pipe) to this
PIPE_BYTES = int(getattr(procs, "_PIPE_BYTES", 65536))


def raw_window_lines(line_bytes: int, batch_max_lines: int, batch_max_bytes: int,
                     chunk: int = 50) -> int:
    """The most raw lines one agent SIGKILL can lose: the collector's stdout pipe (PIPE_BYTES),
    the agent's read chunk in hand (64 KiB), 3 + SLOTS batches (each bounded by ``max_lines``
    and ``max_bytes``: the one filling in the batcher, the one its reader holds while the agent's
    hand-over queue is full, the SLOTS in that queue, the one the spool writer is committing),
    plus the RAW writer's chunk counted but not yet printed. The pipe and the queue only fill
    when the agent stalls (a full disk, a slow commit)."""
    batch = min(batch_max_lines, batch_max_bytes // line_bytes + 1)
    return (PIPE_BYTES + 65536) // line_bytes + (3 + SLOTS) * batch + chunk


def token_committed(state_dir: Path, collector: str) -> bool:
    """True once the spool holds a checkpoint token of ``collector`` (read-only peek)."""
    db = state_dir / "spool.db"
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        try:
            return c.execute("SELECT 1 FROM spool_checkpoints WHERE collector = ?",
                             (collector,)).fetchone() is not None
        except sqlite3.OperationalError:
            return False


def first_tokens(agent: AgentProc, w: Workload, timeout_s: float = 20.0) -> None:
    """Wait until every checkpointing collector has committed its first token. Before that a
    collector is not known to checkpoint: its lines are batched by time, and a crash makes it
    start over (docs/reliability.md, "the first run")."""
    names = list(w.ckpts) + (["tail"] if w.writers else [])
    wait_until(lambda: all(token_committed(agent.state_dir, n) for n in names), timeout_s,
               what=f"first tokens of {names}")


def poll_progress(w: Workload, data_dir: Path, more: int, timeout_s: float = 30.0) -> None:
    """Wait until ``more`` further lines have arrived (so a fault hits a busy pipeline)."""
    goal = w.received(data_dir) + more
    wait_until(lambda: w.received(data_dir) >= goal, timeout_s, interval_s=0.05,
               what=f"{more} more lines delivered")


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 1)

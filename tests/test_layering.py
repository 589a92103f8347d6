"""The import rules of the house, read from the source with ``ast`` (module docstrings no longer
list their imports; this test is where the rules live).

- spoolagent: ``cli -> agent -> {collect, spool, sender, status, heartbeat} -> core`` where core is
  ``protocol, config, collector_settings, answers, delivery, errors, runtime, snapshot`` and the
  root;
  nothing imports upward, and collect, spool, sender, status and heartbeat never import each
  other.
- ``spoolagent`` and ``receiver`` never import each other.
- ``spoolcore`` imports neither, and nothing outside the standard library.
- nats (nats-py) only in ``receiver/cluster/``: a standalone receiver never loads it.
- one owner per foreign library: persistqueue only in ``spool/queue.py`` (``_pq`` names its
  internals as data), httpx and tenacity only in ``sender.py``.
- the bundled collectors import the standard library, ``spoolagent.protocol`` and their own
  helpers (inotify through ctypes in ``lib/tail_watch.py``, not a library: it costs memory).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"protocol", "config", "collector_settings", "answers", "delivery", "errors", "runtime", "wire",
        "snapshot", ""}
PARTS = {"collect", "spool", "sender", "status", "heartbeat"}
OWNERS = {"persistqueue": {"spoolagent.spool.queue"}, "httpx": {"spoolagent.sender"},
          "tenacity": {"spoolagent.sender"}}
COLLECTOR_EXTRAS = {"spoolagent_collectors"}
RANK = {"cli": 3, "__main__": 3, "agent": 2, **dict.fromkeys(PARTS, 1), **dict.fromkeys(CORE, 0)}


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    base = ROOT / package
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join([package, *parts]), path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module a file imports (``from a import b`` yields ``a.b`` too: b may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _part(module: str) -> str | None:
    """The layer a spoolagent module belongs to: its first component under the package."""
    parts = module.split(".")
    if parts[0] != "spoolagent":
        return None
    name = parts[1] if len(parts) > 1 else ""
    return name if name in RANK else None


def _allowed(mine: str, theirs: str) -> bool:
    """Down the ranks, never sideways between the parts (collect, spool, sender, status)."""
    if mine == theirs:
        return True
    if mine in PARTS and theirs in PARTS:
        return False
    return RANK[theirs] <= RANK[mine]


def _violations() -> Iterator[str]:
    for package in ("spoolagent", "receiver", "spoolcore", "collectors"):
        for module, path in _modules(package):
            where = f"{path.relative_to(ROOT)}"
            for line, target in _imports(path):
                top = target.split(".")[0]
                if package == "spoolcore" and top not in sys.stdlib_module_names and top != "spoolcore":
                    yield f"{where}:{line}: spoolcore imports {target} (standard library only)"
                if package == "receiver" and top == "spoolagent":
                    yield f"{where}:{line}: the receiver imports the agent ({target})"
                if package == "receiver" and top == "nats" and not module.startswith("receiver.cluster."):
                    yield f"{where}:{line}: only receiver/cluster/ may import nats ({target})"
                if package == "collectors" and top not in sys.stdlib_module_names and not (
                        target.startswith("spoolagent.protocol") or top in COLLECTOR_EXTRAS
                        or target == "spoolagent"):
                    yield f"{where}:{line}: a bundled collector imports {target}"
                if package != "spoolagent":
                    continue
                if top in OWNERS and module not in OWNERS[top]:
                    yield f"{where}:{line}: only {', '.join(sorted(OWNERS[top]))} may import {top}"
                if top == "receiver":
                    yield f"{where}:{line}: the agent imports the receiver ({target})"
                mine, theirs = _part(module), _part(target)
                if mine is not None and theirs is not None and not _allowed(mine, theirs):
                    yield f"{where}:{line}: {mine} must not import {theirs} ({target})"


def test_no_module_imports_against_the_layering() -> None:
    assert list(dict.fromkeys(_violations())) == []


def test_every_spoolagent_module_has_a_place_in_the_layering() -> None:
    """A new top-level module or subpackage must be placed in RANK (else nothing checks it)."""
    names = {p.stem for p in (ROOT / "spoolagent").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert names - set(RANK) == set()


@pytest.mark.parametrize(("module", "target", "allowed"), [
    ("spoolagent.collect.batcher", "spoolagent.spool.queue", False),
    ("spoolagent.protocol", "spoolagent.agent", False),
    ("spoolagent.agent", "spoolagent.cli.commands", False),
    ("spoolagent.cli.commands", "spoolagent.agent", True),
    ("spoolagent.spool.queue", "spoolagent.errors", True),
    ("spoolagent.status", "spoolagent.sender", False),
    ("spoolagent.config", "spoolagent.protocol", True),
])
def test_the_rule_itself(module: str, target: str, allowed: bool) -> None:
    mine, theirs = _part(module), _part(target)
    assert mine is not None and theirs is not None
    assert _allowed(mine, theirs) is allowed


# What a long-running process must not load: each costs RSS on every host of a fleet and none is
# used there (spoolcore/imports.py, status/metrics.py, collectors/lib/tail_token.py say why).
AGENT_NEVER_LOADS = {"asyncio", "tornado", "rich", "click", "pygments", "prometheus_client"}
TAIL_NEVER_LOADS = {"_hashlib", "hashlib", "typing", "asyncio", "sqlite3", "spoolagent.agent"}


def _loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(repr(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    loaded: list[str] = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    return set(loaded)


def test_the_running_agent_loads_no_unused_extras() -> None:
    # what `spoolagent run` imports; prometheus_client comes at the first scrape of /metrics
    assert _loaded_by("import spoolagent.cli.commands, spoolagent.agent") & AGENT_NEVER_LOADS == set()
    # once they are imported, the extras themselves still import normally (the same process may run
    # a receiver: the tests do)
    assert {"tornado", "prometheus_client"} <= _loaded_by(
        "import spoolagent.agent, spoolagent.status.metrics, tornado")


def test_the_tail_collector_loads_only_what_it_needs() -> None:
    tail = ROOT / "collectors" / "0" / "tail.py"
    # as the supervisor runs it, short of main() (runpy would load typing itself)
    code = f"p = {str(tail)!r}\nexec(compile(open(p).read(), p, 'exec'), {{'__name__': 'tail'}})"
    assert _loaded_by(code) & TAIL_NEVER_LOADS == set()

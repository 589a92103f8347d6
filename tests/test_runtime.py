"""The runtime file: written whole, read back, removed on a clean stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoolagent import runtime


def test_write_read_remove(tmp_path: Path) -> None:
    runtime.write(tmp_path, {"pid": 7, "status_url": "http://127.0.0.1:1"})
    assert runtime.path(tmp_path) == tmp_path / "agent.json"  # the CLI, demo and tests rely on the name
    assert runtime.read(tmp_path) == {"pid": 7, "status_url": "http://127.0.0.1:1"}
    assert [p.name for p in tmp_path.iterdir()] == ["agent.json"]  # no temp file left behind
    runtime.remove(tmp_path)
    runtime.remove(tmp_path)  # twice is fine
    with pytest.raises(FileNotFoundError):
        runtime.read(tmp_path)


def test_a_file_that_is_not_an_object_is_a_value_error(tmp_path: Path) -> None:
    runtime.path(tmp_path).write_text("[1, 2]")
    with pytest.raises(ValueError):
        runtime.read(tmp_path)

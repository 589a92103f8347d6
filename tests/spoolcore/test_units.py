"""spoolcore.units: one size/duration grammar, and both programs' config use it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver import config as receiver_config
from receiver.errors import ConfigError as ReceiverConfigError
from spoolagent import config as agent_config
from spoolagent.errors import ConfigError as AgentConfigError
from spoolcore.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    (0, 0), (65536, 65536), ("65536", 65536), ("10B", 10), ("10 b", 10),
    ("64K", 65536), ("64k", 65536), ("64Ki", 65536), ("64KiB", 65536), ("64kib", 65536),
    ("64KB", 64000), ("1.5M", 1572864), ("1MiB", 1 << 20), ("10MB", 10_000_000),
    ("1GiB", 1 << 30), ("1G", 1 << 30), ("1GB", 10**9), ("2T", 2 << 40), ("1TB", 10**12),
])
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [-1, True, 1.5, None, "", "K", "-1K", "1X", "1 KiBs", "1e3", "1iB"])
def test_bad_sizes_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(("text", "expected"), [
    (0, 0.0), (3, 3.0), (2.5, 2.5), ("10", 10.0), ("250ms", 0.25), ("45s", 45.0), ("90m", 5400.0),
    ("12h", 43200.0), ("30d", 2592000.0), ("1w", 604800.0), (" 1.5 s ", 1.5),
])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", [-1, -0.5, False, None, "", "s", "1S", "1y", "-1s", "1 ms s"])
def test_bad_durations_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.one_of(st.integers(min_value=-10, max_value=1 << 40), st.text(max_size=12)))
def test_agent_and_receiver_read_sizes_alike(value: object) -> None:
    """The receiver once took "64K" and the agent did not: both now agree on every input."""
    try:
        expected: int | None = parse_size(value)
    except ValueError:
        expected = None
    try:
        got: int | None = receiver_config.parse_size(value, "max_line")
    except ReceiverConfigError:
        got = None
    assert got == expected


def test_agent_config_takes_64k_and_a_week() -> None:
    cfg = agent_config.from_dict({
        "agent": {"max_line_bytes": "64K", "stop_grace_s": "1w"},
        "collectors": {},
    }, check_paths=False)
    assert cfg.agent.max_line_bytes == 65536
    assert cfg.agent.stop_grace_s == 604800.0
    with pytest.raises(AgentConfigError, match="max_line_bytes"):
        agent_config.from_dict({"agent": {"max_line_bytes": "64X"}}, check_paths=False)

"""The agent config's fleet-view keys: [sender] heartbeat_s, [agent] id's rules, and {agent}/{host}
in collectors' prods (raw, the tailer's paths entries, journald's prod_suffix)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from spoolagent import config
from spoolagent.errors import ConfigError


def _load(tmp_path: Path, **tables: dict[str, object]) -> config.AgentConfig:
    data: dict[str, object] = {"agent": {"id": "web-01@dc1", "collectors_dir": str(tmp_path),
                                         "state_dir": str(tmp_path / "state")}}
    data.update(tables)
    return config.from_dict(data, path=tmp_path / "agent.toml")


def test_placeholders_expand_in_every_prod(tmp_path: Path) -> None:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    cfg = _load(tmp_path, collectors={
        "app": {"format": "raw", "prod": "app.{host}"},
        "tail": {"prod": "logs.{agent}", "paths": ["/var/log/a.log",
                                                  {"glob": "/var/log/n.log", "prod": "nginx.{host}"}]},
        "journald": {"prod_suffix": ".{agent}"},
    })
    assert cfg.collectors["app"]["prod"] == f"app.{host}"
    assert cfg.collectors["tail"]["prod"] == "logs.web-01_dc1"  # '@' cannot be in a PROD
    assert cfg.collectors["tail"]["paths"][1]["prod"] == f"nginx.{host}"
    assert cfg.collectors["tail"]["paths"][0] == "/var/log/a.log"
    assert cfg.collectors["journald"]["prod_suffix"] == ".web-01_dc1"


def test_heartbeat_30s_by_default_0_off_and_agent_id_rules(tmp_path: Path) -> None:
    assert _load(tmp_path).sender.heartbeat_s == 30.0
    assert _load(tmp_path, sender={"heartbeat_s": "0"}).sender.heartbeat_s == 0.0
    assert _load(tmp_path, sender={"heartbeat_s": "2m"}).sender.heartbeat_s == 120.0
    with pytest.raises(ConfigError, match="id"):
        config.from_dict({"agent": {"id": "has space", "collectors_dir": str(tmp_path)}},
                         path=tmp_path / "agent.toml")

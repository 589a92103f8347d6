"""deploy/: the example configs, the systemd units, the container files and the Kubernetes manifests.

What can be checked without systemd as PID 1, a container engine or a cluster: the example configs
load (through ``spoolagent.config``, ``receiver.config`` and the real CLIs) and set every key at its
default; the units pass ``systemd-analyze verify`` and ``security``; the YAML parses into the
structure deploy/README.md describes; the Dockerfiles' HEALTHCHECK commands succeed against a real
agent and receiver; and both run, collectors included, with writable+executable memory refused
(the kernel's PR_SET_MDWE, standing in for the units' MemoryDenyWriteExecute=yes).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from receiver import config as receiver_config
from receiver.cluster.cli import build_parser as cluster_parser
from spoolagent import config
from spoolagent.errors import ConfigError
from tests.conftest import ROOT, child_env, wait_until

DEPLOY = ROOT / "deploy"
AGENT_EXAMPLE = DEPLOY / "examples" / "agent.toml"
RECEIVER_EXAMPLE = DEPLOY / "examples" / "receiver.toml"
DOCKER_AGENT_TOML = DEPLOY / "docker" / "agent.toml"
UNITS = ("spoolagent", "spoolreceiver")
VENV_BIN = "/opt/spoolagent/venv/bin/"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is needed to parse the compose file and manifests")


def _keys_by_section(text: str) -> dict[str, set[str]]:
    """Keys set or shown commented out (``# key = ...``) in each ``[section]`` of a TOML text."""
    out: dict[str, set[str]] = {"": set()}
    section = ""
    for line in text.splitlines():
        m = re.match(r"^\s*\[([A-Za-z0-9_.]+)\]\s*$", line)
        if m:
            section = m.group(1)
            out.setdefault(section, set())
            continue
        m = re.match(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if m:
            out[section].add(m.group(1))
    return out


def _with_state_dir(text: str, state_dir: Path) -> str:
    new, n = re.subn(r'(?m)^state_dir = ".*"$', f"state_dir = {json.dumps(str(state_dir))}", text)
    assert n == 1, "the config should set state_dir exactly once"
    return new


# --- the agent's example config -------------------------------------------------------------


def test_example_agent_config_loads_and_sets_every_key_at_its_default() -> None:
    cfg = config.load(AGENT_EXAMPLE, check_paths=False)
    defaults = config.from_dict({}, check_paths=False)
    for section in ("agent", "spool", "batch", "sender", "status"):
        assert getattr(cfg, section) == getattr(defaults, section), f"[{section}] differs from the defaults"
    assert cfg.collectors["tail"]["enabled"] is True
    assert "journald" in cfg.collectors


def test_example_agent_config_names_every_key() -> None:
    shown = _keys_by_section(AGENT_EXAMPLE.read_text())
    derived = {"token"}  # read from token_file, not a key
    for section in ("agent", "spool", "batch", "sender", "status"):
        cls = getattr(config, section.capitalize() + "Section")
        keys = {f.name for f in dataclasses.fields(cls)} - derived
        missing = keys - shown.get(section, set())
        assert not missing, f"deploy/examples/agent.toml does not show [{section}] {sorted(missing)}"


def test_example_agent_config_path_problems_are_only_the_host_state_dir(tmp_path: Path) -> None:
    try:
        config.load(AGENT_EXAMPLE)
    except ConfigError as exc:  # e.g. not root: /var/lib is not writable
        problems = str(exc).splitlines()
        assert problems and all("[agent] state_dir" in p for p in problems), problems
    copy = tmp_path / "agent.toml"
    copy.write_text(_with_state_dir(AGENT_EXAMPLE.read_text(), tmp_path / "state"))
    cfg = config.load(copy)
    assert cfg.agent.state_dir == tmp_path / "state"
    assert cfg.agent.collectors_dir == config.bundled_collectors_dir()


def _check_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoolagent", "check", "--config", str(path)],
                          capture_output=True, text=True, env=child_env(), timeout=60)


@pytest.mark.parametrize("source", [AGENT_EXAMPLE, DOCKER_AGENT_TOML], ids=["example", "docker"])
def test_agent_configs_pass_spoolagent_check(tmp_path: Path, source: Path) -> None:
    if not _has_module("spoolagent.cli.commands"):
        pytest.skip("spoolagent.cli.commands is not there yet")
    good = tmp_path / "agent.toml"
    good.write_text(_with_state_dir(source.read_text(), tmp_path / "state"))
    done = _check_cli(good)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("[batch]\n", "[batch]\nmax_linez = 1\n", 1)
                   if "[batch]\n" in good.read_text() else good.read_text() + "\n[batch]\nmax_linez = 1\n")
    done = _check_cli(bad)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "max_linez" in done.stdout + done.stderr


def _tail_settings(table: dict[str, Any]) -> Any:
    """collectors/0/tail.py's own settings class (spoolagent_collectors.lib.tail_settings)."""
    from spoolagent_collectors.lib.tail_settings import Settings

    return Settings(table, inotify_available=True)


def test_example_tail_settings_are_the_collectors_own_defaults(capfd: pytest.CaptureFixture[str]) -> None:
    table = dict(config.load(AGENT_EXAMPLE, check_paths=False).collectors["tail"])
    example = _tail_settings(table)
    defaults = _tail_settings({"paths": table["paths"]})
    assert "unknown setting" not in capfd.readouterr().err
    differ = {k for k in vars(defaults) if vars(defaults)[k] != vars(example)[k]}
    assert not differ, f"[collectors.tail] in the example differs from tail.py's defaults: {sorted(differ)}"


def _configmap_agent_toml() -> dict[str, Any]:
    yaml = _yaml()
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "daemonset.yaml").read_text()) if d]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return tomllib.loads(cm["data"]["agent.toml"])


def test_container_agent_configs_listen_on_all_interfaces_and_skip_journald() -> None:
    docker = config.load(DOCKER_AGENT_TOML, check_paths=False)
    k8s = config.from_dict(_configmap_agent_toml(), check_paths=False)
    for cfg in (docker, k8s):
        assert cfg.status.listen == "0.0.0.0:9108"
        assert cfg.collectors["journald"]["enabled"] is False
        assert cfg.agent.state_dir == Path("/var/lib/spoolagent")
    assert docker.sender.receivers == ("http://receiver:8016",)
    assert k8s.collectors["tail"]["paths"] == ["/var/log/containers/*.log"]
    date_rx = re.compile(k8s.collectors["tail"]["date_regex"])
    m = date_rx.search("2024-05-01T23:59:59.123456789Z stdout F hello")
    assert m is not None and m.group(1) == "2024-05-01"
    for cfg in (docker, k8s):
        _tail_settings(dict(cfg.collectors["tail"]))  # raises on a setting it cannot use


# --- the receiver's example config ----------------------------------------------------------


def test_example_receiver_config_loads_and_sets_every_key_at_its_default() -> None:
    rconfig = pytest.importorskip("receiver.config")
    cfg = rconfig.load({}, RECEIVER_EXAMPLE)
    assert cfg == rconfig.load({"data_dir": "/var/lib/spoolreceiver", "listen": "0.0.0.0:8016"})
    keys = getattr(rconfig, "_KEYS", None)
    if keys is not None:
        missing = set(keys) - _keys_by_section(RECEIVER_EXAMPLE.read_text())[""]
        assert not missing, f"deploy/examples/receiver.toml does not show {sorted(missing)}"


# --- systemd ----------------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / f"{name}.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


@pytest.mark.parametrize("name", UNITS)
def test_unit_has_the_documented_settings(name: str) -> None:
    u = _unit(name)
    one = {k: v[-1] for k, v in u.items()}
    assert one["User"] == name and one["StateDirectory"] == name
    assert one["Restart"] == "always"
    assert one["ExecStart"].startswith(VENV_BIN + name)
    assert f"/etc/{name}/" in one["ExecStart"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                       "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "ProtectKernelLogs": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}.items():
        assert one.get(key) == value, f"{name}: {key}={one.get(key)!r}"
    assert "@system-service" in u["SystemCallFilter"]
    # the agent's own stop (collectors' grace, then the in-flight send) must fit in the unit's
    defaults = config.from_dict({}, check_paths=False)
    assert _seconds(one["TimeoutStopSec"]) >= 2 * (defaults.agent.stop_grace_s + defaults.sender.timeout_s) - 1
    sysusers = (DEPLOY / "systemd" / "spoolagent.sysusers.conf").read_text()
    assert re.search(rf"(?m)^u\s+{name}\s", sysusers), f"sysusers.d does not create {name}"


def test_agent_unit_lets_the_agent_stop_its_collectors() -> None:
    u = _unit("spoolagent")
    one = {k: v[-1] for k, v in u.items()}
    # reload = check the config, then SIGHUP (the agent re-reads [collectors.*] and rescans)
    assert u["ExecReload"] == [f"{VENV_BIN}spoolagent check --config /etc/spoolagent/agent.toml",
                               "/bin/kill -HUP $MAINPID"]
    assert one["KillMode"] == "mixed"
    assert set(one["SupplementaryGroups"].split()) == {"adm", "systemd-journal"}
    assert one["RestartPreventExitStatus"] == "2"


def test_receiver_unit_reload_is_a_sighup_to_the_main_process() -> None:
    # receiver/server.py: SIGHUP re-reads the token file and is passed on to the workers
    assert _unit("spoolreceiver")["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert _unit("spoolreceiver")["KillMode"] == ["control-group"]


def _units_with_stand_in_binaries(tmp_path: Path) -> list[Path]:
    """Copies of the units whose ExecStart/ExecReload point at stand-ins: the venv isn't installed here."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in UNITS:
        stub = bindir / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    out = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / f"{name}.service").read_text()
        assert VENV_BIN in text
        copy = tmp_path / f"{name}.service"
        copy.write_text(text.replace(VENV_BIN, f"{bindir}/"))
        out.append(copy)
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = _units_with_stand_in_binaries(tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                          capture_output=True, text=True, timeout=120)
    # verify exits 0 on unknown keys and only warns: any line about our units is a failure
    ours = [ln for ln in (done.stdout + done.stderr).splitlines() if re.search(r"spool(agent|receiver)", ln)]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


def test_units_sandbox_exposure_is_low(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = _units_with_stand_in_binaries(tmp_path)
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", "--threshold=20",
                           *map(str, units)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if "Unknown option" in done.stderr or "unrecognized option" in done.stderr:
        pytest.skip("this systemd-analyze has no offline security analysis")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr  # exposure <= 2.0 of 10


# --- containers -------------------------------------------------------------------------------


def _final_stage(dockerfile: Path) -> list[str]:
    """The instructions of the last stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def _healthcheck_argv(dockerfile: Path) -> list[str]:
    hc = [ln for ln in _final_stage(dockerfile) if ln.upper().startswith("HEALTHCHECK ")]
    assert len(hc) == 1, f"{dockerfile.name}: one HEALTHCHECK expected"
    argv = json.loads(hc[0].split(" CMD ", 1)[1])
    assert isinstance(argv, list) and argv[0] == "python"
    return argv


@pytest.mark.parametrize("name", ["agent", "receiver"])
def test_dockerfile_runs_as_non_root_with_a_healthcheck(name: str) -> None:
    path = DEPLOY / "docker" / f"Dockerfile.{name}"
    stage = _final_stage(path)
    assert stage[0] == "FROM python:3.11-slim"
    users = [ln.split(None, 1)[1] for ln in stage if ln.upper().startswith("USER ")]
    assert users, f"{path.name}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root"), f"{path.name}: runs as {users[-1]}"
    _healthcheck_argv(path)
    assert any(ln.startswith("ENTRYPOINT") and "tini" in ln for ln in stage)
    # everything COPY'd from the build context exists in the repository
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for m in re.finditer(r"(?m)^COPY (?!--from)(.+)$", text):
        *sources, _dest = m.group(1).split()
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src} is not in the build context"


def test_compose_wires_agent_to_receiver_with_named_volumes() -> None:
    yaml = _yaml()
    path = DEPLOY / "docker" / "compose.yaml"
    doc = yaml.safe_load(path.read_text())
    services, volumes = doc["services"], doc["volumes"]
    assert {"agent", "receiver"} <= set(services)
    for name in ("agent", "receiver"):
        svc = services[name]
        assert svc["healthcheck"]["test"][0] == "CMD"
        build = svc["build"]
        assert (path.parent / build["context"] / build["dockerfile"]).is_file()
        assert build["dockerfile"].endswith(f"Dockerfile.{name}")
    mounts = {name: {m.split(":")[1]: m for m in services[name]["volumes"]} for name in ("agent", "receiver")}
    assert mounts["agent"]["/var/lib/spoolagent"].split(":")[0] in volumes
    assert mounts["receiver"]["/var/lib/spoolreceiver"].split(":")[0] in volumes
    logs = mounts["agent"]["/var/log/app"]
    assert logs.split(":")[0] in volumes and logs.endswith(":ro")
    config_mount = mounts["agent"]["/etc/spoolagent/agent.toml"].split(":")[0]
    assert (path.parent / config_mount).resolve() == DOCKER_AGENT_TOML
    # the agent's config points at the receiver service and at the mounted logs
    cfg = config.load(DOCKER_AGENT_TOML, check_paths=False)
    assert cfg.sender.receivers == ("http://receiver:8016",)
    assert all(p.startswith("/var/log/app/") for p in cfg.collectors["tail"]["paths"])
    assert "--listen" in services["receiver"]["command"] and "0.0.0.0:8016" in services["receiver"]["command"]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not os.access(exe, os.X_OK):
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    done = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker" / "compose.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# --- Kubernetes -------------------------------------------------------------------------------


def _manifests(name: str) -> dict[str, dict[str, Any]]:
    yaml = _yaml()
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_daemonset_tails_container_logs_read_only_and_keeps_the_spool_on_the_node() -> None:
    m = _manifests("daemonset.yaml")
    assert "Service" not in m  # the agent pushes
    ds = m["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {vm["mountPath"]: vm for vm in container["volumeMounts"]}
    for path in ("/var/log/containers", "/var/log/pods"):
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    state = volumes[mounts["/var/lib/spoolagent"]["name"]]
    assert state["hostPath"] == {"path": "/var/lib/spoolagent", "type": "DirectoryOrCreate"}
    assert volumes[mounts["/etc/spoolagent"]["name"]]["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    port = container["ports"][0]
    cfg = config.from_dict(_configmap_agent_toml(), check_paths=False)
    assert cfg.status.listen.endswith(f":{port['containerPort']}")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
        assert container[probe]["httpGet"]["path"] in ("/status", "/metrics")
    assert pod["terminationGracePeriodSeconds"] >= 2 * (cfg.agent.stop_grace_s + cfg.sender.timeout_s) - 1
    assert container["resources"]["limits"]["memory"]
    assert cfg.sender.receivers[0].startswith("http://" + _manifests("receiver.yaml")["Service"]["metadata"]["name"])


def test_receiver_manifests_have_a_deployment_a_service_and_a_claim() -> None:
    m = _manifests("receiver.yaml")
    dep, svc, pvc = m["Deployment"], m["Service"], m["PersistentVolumeClaim"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_manifests_match_the_kubernetes_schemas() -> None:
    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not os.access(exe, os.X_OK):
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    done = subprocess.run([exe, "--strict", "--quiet", *map(str, sorted((DEPLOY / "k8s").glob("*.yaml")))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the real thing, with writable+executable memory refused --------------------------------

_MDWE_WRAPPER = """\
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(78)
except OSError:
    pass
os.execv(sys.argv[1], sys.argv[1:])
"""


def _spawn_mdwe(tmp_path: Path, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
    wrapper = tmp_path / "mdwe.py"
    wrapper.write_text(_MDWE_WRAPPER)
    log = open(tmp_path / log_name, "ab")
    try:
        return subprocess.Popen([sys.executable, str(wrapper), sys.executable, *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    finally:
        log.close()


def _run_healthcheck(dockerfile: Path, url: str) -> None:
    """Run the image's HEALTHCHECK command, with this Python and the address of the real process."""
    argv = _healthcheck_argv(dockerfile)
    code = re.sub(r"http://127\.0\.0\.1:\d+", url, argv[-1])
    assert code != argv[-1]
    done = subprocess.run([sys.executable, *argv[1:-1], code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _stop(proc: subprocess.Popen[bytes], group: bool) -> int:
    if proc.poll() is None:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_examples_run_with_write_execute_memory_refused(tmp_path: Path) -> None:
    """The example configs, run for real under MDWE: tail -> agent -> receiver, healthchecks, stop."""
    if not (_has_module("spoolagent.cli.commands") and _has_module("receiver.cli")):
        pytest.skip("spoolagent.cli.commands or receiver.cli is not there yet")
    if not (ROOT / "collectors" / "0" / "tail.py").exists():
        pytest.skip("collectors/0/tail.py is not there yet")
    ready = tmp_path / "receiver-ready.json"
    data_dir = tmp_path / "data"
    receiver = _spawn_mdwe(tmp_path, ["-m", "receiver", "--config", str(RECEIVER_EXAMPLE), "--data-dir",
                                      str(data_dir), "--listen", "127.0.0.1:0", "--ready-file", str(ready)],
                           "receiver.log")
    agent: subprocess.Popen[bytes] | None = None
    try:
        def _receiver_up() -> bool:
            code = receiver.poll()
            if code in (77, 78):
                pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
            assert code is None, (tmp_path / "receiver.log").read_text()
            return ready.exists()

        wait_until(_receiver_up, 30, what="receiver ready file")
        http = "http://" + json.loads(ready.read_text())["http"]
        _run_healthcheck(DEPLOY / "docker" / "Dockerfile.receiver", http)

        app_log = tmp_path / "logs" / "app.log"
        app_log.parent.mkdir()
        app_log.write_bytes(b"".join(b"deploy line %d\n" % i for i in range(500)))
        text = _with_state_dir(AGENT_EXAMPLE.read_text(), tmp_path / "state")
        replacements = [
            (r'(?m)^receivers = \[.*\]$', f"receivers = [{json.dumps(http)}]"),
            (r'(?m)^listen = ".*"$', 'listen = "127.0.0.1:0"'),
            (r'(?ms)^paths = \[.*?^\]$', f"paths = [{{ glob = {json.dumps(str(app_log))}, prod = \"app\" }}]"),
            (r'(?m)^(\[collectors\.journald\]\n(?:#.*\n)*)enabled = true$', r"\1enabled = false"),
        ]
        for pattern, repl in replacements:
            text, n = re.subn(pattern, repl, text)
            assert n == 1, pattern
        cfg_path = tmp_path / "agent.toml"
        cfg_path.write_text(text)
        agent = _spawn_mdwe(tmp_path, ["-m", "spoolagent", "run", "--config", str(cfg_path)], "agent.log")
        runtime = tmp_path / "state" / "agent.json"

        def _agent_up() -> bool:
            assert agent is not None and agent.poll() is None, (tmp_path / "agent.log").read_text()
            return runtime.exists()

        wait_until(_agent_up, 30, what="agent runtime file")
        status_url = json.loads(runtime.read_text())["status_url"]
        _run_healthcheck(DEPLOY / "docker" / "Dockerfile.agent", status_url)

        def _collectors() -> list[str]:
            with urllib.request.urlopen(status_url + "/status", timeout=5) as resp:
                return [c.get("name") for c in json.loads(resp.read()).get("collectors", [])]

        try:
            wait_until(lambda: "tail" in _collectors(), 15, what="the bundled tail collector")
        except AssertionError as exc:
            raise AssertionError(f"the agent did not find the bundled tail collector (collectors: "
                                 f"{_collectors()}); discovery skips non-executable files, so "
                                 f"collectors/0/tail.py must be executable (git mode 100755) or .py "
                                 f"collectors must be run without it") from exc

        def _stored() -> int:
            return sum(p.read_bytes().count(b"\n") for p in data_dir.glob("app_*.dat"))

        def _all_stored() -> bool:
            if _stored() >= 500:
                return True
            assert agent is not None and agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
            return False

        try:
            wait_until(_all_stored, 60, what="500 lines stored")
        except AssertionError as exc:
            with urllib.request.urlopen(status_url + "/status", timeout=5) as resp:
                collectors = json.loads(resp.read()).get("collectors")
            raise AssertionError(f"{exc}; the agent's collectors: {collectors}; its log:\n"
                                 f"{(tmp_path / 'agent.log').read_text()[-3000:]}") from exc
        assert _stored() == 500
        started = time.monotonic()
        assert _stop(agent, group=False) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        # well inside the unit's TimeoutStopSec and the pods' grace
        assert time.monotonic() - started < 10
        log = (tmp_path / "agent.log").read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        if agent is not None:
            _stop(agent, group=False)
        _stop(receiver, group=True)


# --- cluster mode (docs/scaling.md) ------------------------------------------------------------


def test_cluster_compose_has_three_nats_nodes_two_ingest_nodes_and_a_writer() -> None:
    doc = _yaml().safe_load((DEPLOY / "docker" / "compose.cluster.yaml").read_text())
    services = doc["services"]
    nats = [s for s in services if s.startswith("nats")]
    assert len(nats) == 3
    routes = {services[n]["command"][services[n]["command"].index("--routes") + 1] for n in nats}
    assert routes == {",".join(f"nats://{n}:6222" for n in nats)}  # the same list on every node
    urls = ",".join(f"nats://{n}:4222" for n in nats)
    for name in ("ingest1", "ingest2"):
        cfg = receiver_config.load(dict(_flags(services[name]["command"])))
        assert cfg.nats == tuple(urls.split(",")) and cfg.data_dir is None
    writer = cluster_parser().parse_args(services["writer"]["command"])
    assert writer.command == "writer" and writer.nats == urls
    assert any(v.endswith(":" + writer.data_dir) for v in services["writer"]["volumes"])
    init = cluster_parser().parse_args(services["stream-init"]["command"])
    assert init.action == "init" and init.replicas == 3


def test_cluster_compose_matches_the_compose_spec_schema() -> None:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not os.access(exe, os.X_OK):
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    done = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec",
                           str(DEPLOY / "docker" / "compose.cluster.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cluster_manifests_have_an_ingest_deployment_and_a_writer_statefulset() -> None:
    m = _manifests("cluster.yaml")
    ingest, writer = m["Deployment"], m["StatefulSet"]
    (ic,) = ingest["spec"]["template"]["spec"]["containers"]
    cfg = receiver_config.load(dict(_flags(ic["args"])))
    assert cfg.nats and cfg.data_dir is None
    (wc,) = writer["spec"]["template"]["spec"]["containers"]
    args = cluster_parser().parse_args(wc["args"])
    assert args.command == "writer"
    (claim,) = writer["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": args.data_dir} in wc["volumeMounts"]
    assert cluster_parser().parse_args(m["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]).action == "init"


def _flags(argv: list[str]) -> list[tuple[str, str]]:
    """``["--listen", "X", "--nats", "Y"]`` -> the receiver's flag names and values."""
    return [(argv[i][2:].replace("-", "_"), argv[i + 1]) for i in range(0, len(argv), 2)]

"""The alerts of docs/metrics.md, shipped as deploy/prometheus/spoolagent.rules.yml: the file is
valid (``promtool check rules``), each alert fires on the series it is for and not on the near
misses (``promtool test rules``), the doc lists exactly the file's expressions, and every metric an
expression names is one the programs export (issue 15, finding 9: the first alert of the doc
joined series with different labels and could never fire)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "spoolagent.rules.yml"
RULES_TEST = RULES.with_name("spoolagent.rules.test.yml")
DOC = ROOT / "docs" / "metrics.md"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does "
                    "it when it runs as root)")
    return path


def _rule_exprs() -> list[str]:
    return [m.strip() for m in re.findall(r"^\s+expr: (.+)$", RULES.read_text(), re.M)]


def _doc_exprs() -> list[str]:
    block = DOC.read_text().split("```promql\n", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_rules_file_is_valid() -> None:
    p = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_alert_fires_on_its_series_and_not_on_near_misses() -> None:
    p = subprocess.run([_promtool(), "test", "rules", RULES_TEST.name], cwd=RULES.parent,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == set(re.findall(r"- alert: (\w+)", RULES.read_text()))


def test_docs_list_exactly_the_shipped_expressions() -> None:
    assert _doc_exprs() == _rule_exprs()


def test_every_metric_in_an_alert_is_documented() -> None:
    documented = set(re.findall(r"^\| `(spool\w+)`", DOC.read_text(), re.M))
    named = {m for e in _rule_exprs() for m in re.findall(r"\b(spool(?:agent|receiver)_\w+)", e)}
    assert named and named <= documented, named - documented

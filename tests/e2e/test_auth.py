"""Issue 15, findings 2 and 3: token files with several tokens, rotation without a restart, and
answers every batch would get (401/403/404/405) that pause the sender instead of dead-lettering
the stream. Real receivers and agents on loopback."""

from __future__ import annotations

import signal
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProc, ReceiverProc, wait_until
from tests.reliability.checker import CKPT

TOTAL = 3000


def stored_seqs(rcv: ReceiverProc) -> Counter[int]:
    c: Counter[int] = Counter()
    for lines in rcv.read_lines().values():
        for line in lines:
            c[int(line.split(b"seq=", 1)[1][:8])] += 1
    return c


def exactly_once(rcv: ReceiverProc, total: int) -> bool:
    seen = stored_seqs(rcv)
    assert all(n == 1 for n in seen.values()), "a line stored twice"
    return set(seen) == set(range(total))


def agent_with_token(agent_factory: Callable[..., AgentProc], url: str, token_file: Path,
                     delay: float = 0.0) -> AgentProc:
    a = agent_factory([url], batch="max_lines = 100\nmax_wait_ms = 20",
                      sender=f"max_backoff_s = 0.5\ntoken_file = \"{token_file}\"",
                      extra_toml=f"[collectors.ck]\ntotal = {TOTAL}\nevery = 50\ndelay = {delay}\n")
    a.add_collector("ck.py", CKPT)
    return a


def log_count(text: Callable[[], str], needle: str) -> int:
    return text().count(needle)


def test_token_rotation_without_restart_loses_and_dead_letters_nothing(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    rtok, atok = tmp_path / "receiver.token", tmp_path / "agent.token"
    rtok.write_text("old-token\n")
    atok.write_text("old-token\n")
    rcv = receiver_factory("--token-file", str(rtok))
    a = agent_with_token(agent_factory, rcv.url, atok, delay=0.05).start()
    wait_until(lambda: len(stored_seqs(rcv)) >= 200, 30, what="first lines stored")

    # 1. the receiver accepts old and new
    rtok.write_text("# rotation 2026-11\nold-token\n\nnew-token\n")
    rcv.send_signal(signal.SIGHUP)
    wait_until(lambda: "tokens re-read" in rcv.log_text(), 10, what="receiver reload")
    # 2. the agent moves to the new one (the first in its file)
    atok.write_text("new-token\nold-token\n")
    a.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "reload: token re-read" in a.log_text(), 10, what="agent reload")
    # 3. the receiver drops the old one
    rtok.write_text("new-token\n")
    rcv.send_signal(signal.SIGHUP)
    wait_until(lambda: log_count(rcv.log_text, "tokens re-read") >= 2, 10, what="receiver reload")

    wait_until(lambda: exactly_once(rcv, TOTAL), 60, what="every line stored once")
    status = a.get_status()
    assert status["sender"]["batches_failed"] == 0
    assert status["spool"]["failed_batches"] == 0
    assert "old-token" not in a.log_text() + rcv.log_text()
    assert "new-token" not in a.log_text() + rcv.log_text()


def test_401_pauses_the_sender_and_keeps_every_batch(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    # finding 2: a 401 used to dead-letter the whole stream, one ERROR per batch, while status
    # said `sender idle`, `failures in a row 0` and spoolagent_sender_up 1
    rtok, atok = tmp_path / "receiver.token", tmp_path / "agent.token"
    rtok.write_text("right\n")
    atok.write_text("wrong\n")
    rcv = receiver_factory("--token-file", str(rtok))
    a = agent_with_token(agent_factory, rcv.url, atok).start()

    wait_until(lambda: a.get_status()["sender"]["state"] == "unauthorized", 30,
               what="sender state unauthorized")
    status = a.get_status()
    assert status["spool"]["failed_batches"] == 0 and status["sender"]["batches_failed"] == 0
    with urllib.request.urlopen(a.status + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'spoolagent_sender_state{state="unauthorized"} 1.0' in metrics
    assert "spoolagent_sender_up 0.0" in metrics
    text = a.cli("status")
    assert text.returncode == 0, text.stderr
    assert "sender  unauthorized" in text.stdout and "sender paused" in text.stdout
    assert "last error" in text.stdout and "401" in text.stdout
    assert a.log_text().count("sender paused state=unauthorized") == 1  # not one line per batch

    # the fix: the right token, a reload; nothing was dead-lettered, so nothing to retry
    atok.write_text("right\n")
    a.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: exactly_once(rcv, TOTAL), 60, what="every line stored once")
    assert a.get_status()["spool"]["failed_batches"] == 0
    assert "wrong" not in a.log_text()


def test_404_from_a_wrong_url_path_pauses_as_misconfigured(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url + "/not-here"], sender="max_backoff_s = 0.5",
                      extra_toml=f"[collectors.ck]\ntotal = {TOTAL}\nevery = 50\n")
    a.add_collector("ck.py", CKPT)
    a.start()
    wait_until(lambda: a.get_status()["sender"]["state"] == "misconfigured", 30,
               what="sender state misconfigured")
    assert a.get_status()["spool"]["failed_batches"] == 0
    # the fix: the right URL, a reload (reload applies [sender] receivers)
    a.config.write_text(a.config.read_text().replace(receiver.url + "/not-here", receiver.url))
    a.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: exactly_once(receiver, TOTAL), 60, what="every line stored once")
    assert a.get_status()["spool"]["failed_batches"] == 0


def test_token_file_with_a_bad_line_is_a_config_error_that_never_shows_the_token(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    # finding 3: two tokens on one line passed `check` and the receiver, then the agent logged
    # the token (Illegal header value b'Bearer ...') and /status showed it
    bad = tmp_path / "bad.token"
    bad.write_text("# two tokens on one line\nsecret-one secret-two\n")
    a = agent_with_token(agent_factory, "http://127.0.0.1:9", bad)
    check = a.cli("check")
    assert check.returncode == 2
    assert "line 2" in check.stderr + check.stdout
    assert "secret" not in check.stderr + check.stdout
    rcv = receiver_factory("--token-file", str(bad), start=False)
    try:
        rcv.start(timeout_s=10)
    except AssertionError as exc:
        assert "exited 2" in str(exc) and "line 2" in str(exc)
        assert "secret" not in rcv.log_text()
    else:
        raise AssertionError("the receiver started with a bad token file")

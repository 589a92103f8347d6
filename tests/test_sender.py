"""Sender against real HTTP servers on 127.0.0.1: purpose-built faulty receivers, and the real one.

The faulty receivers are small ``http.server`` servers in threads that answer from a script
(503 N times, Retry-After, 400, dropped keep-alive connections, ...), so every fault is a real
socket-level event; nothing in httpx or the sender is mocked.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spoolagent.delivery import SenderState
from spoolagent.errors import BatchRejected, ConfigError, ReceiverUnavailable
from spoolagent.sender import Sender, SendResult
from spoolagent.status import metrics
from tests.conftest import ReceiverProc, wait_until

pytestmark = pytest.mark.timeout(60)

BODY = b"app 2024-01-02 hello\napp 2024-01-02 world\n"
DROP = -1  # a Reply with this status closes the connection without answering


@dataclass
class Reply:
    status: int = 201
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: the receiver's JSON answer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class FaultyReceiver:
    """A receiver that fails on purpose: answers each PUT with the next scripted Reply, then with
    ``default``. ``hook`` runs in the handler thread before the answer."""

    def __init__(self, *replies: Reply, default: Reply | None = None, port: int = 0,
                 tls: ssl.SSLContext | None = None, drop_reused: bool = False,
                 hook: Callable[[], None] | None = None) -> None:
        self.replies = list(replies)
        self.default = default or Reply()
        self.seen: list[Seen] = []
        self.hook = hook
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def setup(self) -> None:
                super().setup()
                self.served = 0

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with fake.lock:
                    fake.seen.append(Seen(self.command, self.path,
                                          {k.lower(): v for k, v in self.headers.items()},
                                          body, self.client_address[1]))
                    reply = fake.replies.pop(0) if fake.replies else fake.default
                self.served += 1
                if fake.hook is not None:
                    fake.hook()
                if reply.status == DROP or (drop_reused and self.served > 1):
                    self.close_connection = True  # a stale keep-alive connection: no answer
                    return
                answer = reply.body
                if answer is None:
                    data = gzip.decompress(body) if self.headers.get(
                        "Content-Encoding") == "gzip" else body
                    answer = json.dumps({"batch_id": self.path.rsplit("/", 1)[-1],
                                         "stored": data.count(b"\n"), "rejected": 0,
                                         "duplicate": reply.status == 200}).encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


MakeServer = Callable[..., "FaultyReceiver"]
MakeSender = Callable[..., Sender]


@pytest.fixture
def servers() -> Iterator[Callable[..., FaultyReceiver]]:
    made: list[FaultyReceiver] = []

    def make(*replies: Reply, **kw: Any) -> FaultyReceiver:
        made.append(FaultyReceiver(*replies, **kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def stopping() -> threading.Event:
    return threading.Event()


@pytest.fixture
def senders(stopping: threading.Event) -> Iterator[Callable[..., Sender]]:
    made: list[Sender] = []

    def make(*urls: str, **kw: Any) -> Sender:
        kw.setdefault("initial_backoff_s", 0.01)
        kw.setdefault("max_backoff_s", 0.05)
        kw.setdefault("timeout_s", 5.0)
        made.append(Sender(urls=urls, stopping=stopping, **kw))
        return made[-1]

    yield make
    stopping.set()
    for s in made:
        s.close()


def free_port() -> int:
    """A port nobody listens on (connection refused), for the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def messages(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "spoolagent.sender" and r.getMessage().startswith(prefix)]


# -- the request on the wire ------------------------------------------------------------------

def test_put_carries_id_body_token_and_encoding(servers: MakeServer, senders: MakeSender) -> None:
    srv = servers()
    sender = senders(srv.url, token="s3cret")
    gz = gzip.compress(BODY)
    res = sender.send("b-0001", gz, "gzip", lines=2)
    assert res == SendResult(status=201, stored=2, rejected=0, duplicate=False, receiver=srv.url)
    (req,) = srv.seen
    assert (req.method, req.path, req.body) == ("PUT", "/v1/batches/b-0001", gz)
    assert req.headers["authorization"] == "Bearer s3cret"
    assert req.headers["content-encoding"] == "gzip"
    assert req.headers["content-type"] == "text/plain"
    sender.send("b-0002", BODY, "identity", lines=2)
    assert "content-encoding" not in srv.seen[1].headers
    assert srv.seen[1].body == BODY
    stats = sender.stats()
    assert stats["batches_sent"] == 2 and stats["lines_sent"] == 4
    assert stats["bytes_sent"] == len(gz) + len(BODY) and stats["requests_total"] == 2
    st = sender.state()
    assert st["state"] == "idle" and st["receiver"] == srv.url
    assert isinstance(st["last_success_s"], float) and st["consecutive_failures"] == 0


def test_no_token_no_authorization_header(servers: MakeServer, senders: MakeSender) -> None:
    srv = servers()
    senders(srv.url).send("b1", BODY, "identity")
    assert "authorization" not in srv.seen[0].headers


@pytest.mark.parametrize("answer", [b'{"stored": -5, "rejected": 0}', b'{"stored": 1e309, "rejected": 0}',
                                    b'{"stored": "2", "rejected": 0}', b'{"stored": 2.5, "rejected": 0}',
                                    b'not json at all'])
def test_2xx_with_an_absurd_answer_acks_the_batch_once(servers: MakeServer, senders: MakeSender,
                                                       answer: bytes) -> None:
    # issue 15 finding 7: "stored": 1e309 raised OverflowError out of send(): the batch was
    # resent every second with a traceback
    srv = servers(Reply(201, body=answer))
    res = senders(srv.url).send("b1", BODY, "identity", lines=2)
    assert (res.status, res.stored, res.rejected) == (201, 2, 0) and len(srv.seen) == 1


def test_duplicate_answer_is_reported(servers: MakeServer, senders: MakeSender) -> None:
    srv = servers(Reply(200))
    res = senders(srv.url).send("b1", BODY, "identity", lines=2)
    assert res.status == 200 and res.duplicate and res.stored == 2
    assert senders(srv.url).send("b1", BODY, "identity").duplicate is False  # then 201


def test_keepalive_connection_reused_across_sends(servers: MakeServer, senders: MakeSender) -> None:
    srv = servers()
    sender = senders(srv.url)
    for i in range(5):
        sender.send(f"b{i}", BODY, "identity")
    assert len({r.client_port for r in srv.seen}) == 1


def test_malformed_batch_id_is_refused_before_sending(servers: MakeServer,
                                                      senders: MakeSender) -> None:
    srv = servers()
    with pytest.raises(ValueError):
        senders(srv.url).send("../etc", BODY, "identity")
    assert srv.seen == []


def test_bad_url_and_missing_ca_file_are_config_errors(stopping: threading.Event,
                                                       tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="receivers"):
        Sender(urls=["ftp://x"], stopping=stopping)
    with pytest.raises(ConfigError, match="ca_file"):
        Sender(urls=["https://127.0.0.1:1"], stopping=stopping,
               ca_file=str(tmp_path / "missing.pem"))


# -- retries ------------------------------------------------------------------------------

def test_503_retried_until_201(servers: MakeServer, senders: MakeSender,
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spoolagent.sender")
    srv = servers(Reply(503), Reply(503), Reply(503))
    sender = senders(srv.url)
    res = sender.send("b1", BODY, "identity", lines=2)
    assert res.status == 201 and len(srv.seen) == 4
    assert {r.path for r in srv.seen} == {"/v1/batches/b1"}  # same id every time
    assert sender.stats()["batches_retried"] == 3
    assert len(messages(caplog, "send failed")) == 1
    assert len(messages(caplog, "send recovered")) == 1


def test_408_is_retried(servers: MakeServer, senders: MakeSender) -> None:
    srv = servers(Reply(408))
    assert senders(srv.url).send("b1", BODY, "identity").status == 201
    assert len(srv.seen) == 2


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_seconds_is_honoured(servers: MakeServer, senders: MakeSender,
                                         status: int) -> None:
    srv = servers(Reply(status, {"Retry-After": "1"}))
    sender = senders(srv.url)
    t0 = time.monotonic()
    assert sender.send("b1", BODY, "identity").status == 201
    assert time.monotonic() - t0 >= 1.0  # not the 0.01 s exponential wait
    assert len(srv.seen) == 2


def test_retry_after_http_date_is_honoured(servers: MakeServer, senders: MakeSender) -> None:
    # an HTTP date has whole seconds: "now + 2 s" is between 1 and 2 s away
    srv = servers(Reply(429, {"Retry-After": formatdate(time.time() + 2, usegmt=True)}))
    t0 = time.monotonic()
    assert senders(srv.url).send("b1", BODY, "identity").status == 201
    assert time.monotonic() - t0 >= 1.0


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_4xx_rejects_at_once_without_retry(servers: MakeServer, senders: MakeSender,
                                           caplog: pytest.LogCaptureFixture, status: int) -> None:
    srv = servers(Reply(status, body=b"bad line 3: no date"))
    sender = senders(srv.url)
    with pytest.raises(BatchRejected) as info:
        sender.send("b1", BODY, "identity")
    assert info.value.status == status
    assert str(info.value).startswith(str(status)) and "bad line 3: no date" in str(info.value)
    assert len(srv.seen) == 1
    stats = sender.stats()
    assert stats["batches_failed"] == 1 and stats["batches_retried"] == 0
    assert "rejected" in str(sender.state()["last_error"])
    assert len(messages(caplog, "send rejected")) == 1
    assert info.value.code == f"http_{status}"


@pytest.mark.parametrize(("status", "state"), [(401, "unauthorized"), (403, "unauthorized"),
                                               (404, "misconfigured"), (405, "misconfigured")])
def test_answer_every_batch_would_get_pauses_and_never_rejects(
        servers: MakeServer, senders: MakeSender, caplog: pytest.LogCaptureFixture,
        status: int, state: str) -> None:
    # issue 15 #2: a 401 used to dead-letter the whole stream while status said `idle`
    caplog.set_level(logging.INFO, logger="spoolagent.sender")
    srv = servers(Reply(status), Reply(status), Reply(status))
    sender = senders(srv.url)
    t, out = in_thread(lambda: sender.send("b1", BODY, "identity"))
    wait_until(lambda: sender.state()["state"] == state, 5, what=f"state {state}")
    t.join(10)
    assert out["result"].status == 201  # kept and retried until the receiver took it
    assert len(srv.seen) == 4 and sender.stats()["batches_failed"] == 0
    assert sender.state()["state"] == "idle"
    paused = [r for r in caplog.records if r.getMessage().startswith("sender paused")]
    assert len(paused) == 1 and paused[0].levelname == "ERROR"
    assert f"state={state}" in paused[0].getMessage()


def test_set_token_takes_effect_on_the_next_attempt(servers: MakeServer,
                                                    senders: MakeSender) -> None:
    srv = servers(Reply(401))
    sender = senders(srv.url, token="old")
    srv.hook = lambda: sender.set_token("new")  # the operator's SIGHUP, during the first attempt
    assert sender.send("b1", BODY, "identity").status == 201
    assert [r.headers.get("authorization") for r in srv.seen] == ["Bearer old", "Bearer new"]


def test_connection_refused_then_receiver_appears(servers: MakeServer, senders: MakeSender) -> None:
    port = free_port()
    sender = senders(f"http://127.0.0.1:{port}")
    t, out = in_thread(lambda: sender.send("b1", BODY, "identity"))
    wait_until(lambda: sender.stats()["batches_retried"] >= 2, 10, what="refused attempts")
    assert sender.state()["last_error"] and "ConnectError" in str(sender.state()["last_error"])
    srv = servers(port=port)
    t.join(15)
    assert "error" not in out, out
    assert out["result"].status == 201 and len(srv.seen) == 1


def test_stale_keepalive_connection_is_resent_at_once(servers: MakeServer,
                                                      senders: MakeSender) -> None:
    # the server reads a request on a reused connection and closes it without answering: what a
    # keep-alive timeout racing a new request looks like from the client
    srv = servers(drop_reused=True)
    sender = senders(srv.url, initial_backoff_s=5.0, max_backoff_s=5.0)
    for i in range(4):
        assert sender.send(f"b{i}", BODY, "identity").status == 201
    stats = sender.stats()
    assert stats["batches_sent"] == 4 and stats["batches_retried"] == 0
    assert stats["reconnects"] >= 1 and stats["requests_total"] == len(srv.seen)


def test_server_closing_every_connection_after_answering(servers: MakeServer,
                                                         senders: MakeSender) -> None:
    srv = servers(default=Reply(201, {"Connection": "close"}))
    sender = senders(srv.url)
    for i in range(4):
        assert sender.send(f"b{i}", BODY, "identity").status == 201
    assert len({r.client_port for r in srv.seen}) == 4


def test_dropped_connection_without_answer_is_retried(servers: MakeServer,
                                                      senders: MakeSender) -> None:
    srv = servers(Reply(DROP), Reply(DROP), Reply(DROP))
    assert senders(srv.url).send("b1", BODY, "identity").status == 201
    assert len(srv.seen) == 4


# -- failover -----------------------------------------------------------------------------

def test_failover_from_dead_url_to_live_one(servers: MakeServer, senders: MakeSender,
                                            caplog: pytest.LogCaptureFixture) -> None:
    live = servers()
    dead = f"http://127.0.0.1:{free_port()}"
    sender = senders(dead, live.url, failover_after=2)
    res = sender.send("b1", BODY, "identity")
    assert res.receiver == live.url and sender.state()["receiver"] == live.url
    assert len(messages(caplog, "receiver failover")) == 1
    retried = sender.stats()["batches_retried"]
    assert retried == 2
    # the switch is shared: the next batch goes straight to the live receiver
    assert sender.send("b2", BODY, "identity").receiver == live.url
    assert sender.stats()["batches_retried"] == retried and sender.stats()["failovers"] == 1


def test_failover_wraps_round_robin(servers: MakeServer, senders: MakeSender) -> None:
    first = servers(Reply(503), Reply(503))
    second = servers(default=Reply(503))
    sender = senders(first.url, second.url, failover_after=2)
    # first fails twice -> second; second fails twice -> back to first, which now answers
    assert sender.send("b1", BODY, "identity").receiver == first.url
    assert len(first.seen) == 3 and len(second.seen) == 2
    assert sender.state()["receiver"] == first.url
    assert sender.stats()["failovers"] == 2


def test_balance_spread_prefers_a_receiver_at_random(
        servers: MakeServer, senders: MakeSender) -> None:
    a, b, c = servers(), servers(), servers()
    urls = (a.url, b.url, c.url)
    random.seed(13)  # deterministic: 12 agents choosing among 3 receivers
    fleet = [senders(*urls, balance="spread") for _ in range(12)]
    chosen = [s.send(f"s{n}", BODY, "identity").receiver for n, s in enumerate(fleet)]
    assert set(chosen) == set(urls)  # the fleet spreads over every receiver
    assert len(a.seen) + len(b.seen) + len(c.seen) == 12
    assert all(senders(*urls).send(f"o{n}", BODY, "identity").receiver == a.url for n in range(3))


def test_backoff_is_spread_from_the_first_retry(servers: MakeServer, senders: MakeSender,
                                                 stopping: threading.Event) -> None:
    srv = servers(default=Reply(503))
    fleet = [senders(srv.url, initial_backoff_s=10.0, max_backoff_s=10.0) for _ in range(8)]
    threads = [in_thread(lambda s=s, n=n: s.send(f"j{n}", BODY, "identity"))[0]  # type: ignore[misc]
               for n, s in enumerate(fleet)]
    for s in fleet:
        wait_until(lambda s=s: s.state()["state"] == "backoff", 10, what="backoff")  # type: ignore[misc]
    delays = [float(s.state()["retry_delay_s"]) for s in fleet]  # type: ignore[arg-type]
    stopping.set()
    for t in threads:
        t.join(10)
    # the first retry of agents that failed together: half to all of the backoff, all different
    assert all(5.0 <= d <= 10.0 for d in delays) and len(set(delays)) == len(delays), delays


def test_retries_count_their_attempts_from_the_first(servers: MakeServer, senders: MakeSender,
                                                      stopping: threading.Event) -> None:
    """Issue 17: the first attempt runs outside tenacity and a failure goes on in it; the backoff
    still grows from the first retry (attempt numbers 1, 2, 3 ...), each failure told once."""
    srv = servers(default=Reply(503))
    sender = senders(srv.url, initial_backoff_s=0.01, max_backoff_s=0.05)
    numbers: list[int] = []
    exponential = sender._exponential

    def counted(retry_state: Any) -> float:
        numbers.append(retry_state.attempt_number)
        return float(exponential(retry_state))
    sender._exponential = counted  # type: ignore[method-assign]
    failures: list[str] = []
    t, out = in_thread(lambda: sender.send("r1", BODY, "identity", on_failure=failures.append))
    wait_until(lambda: len(srv.seen) >= 4, 10, what="four attempts")
    stopping.set()
    t.join(10)
    assert isinstance(out.get("error"), ReceiverUnavailable)
    assert numbers[:3] == [1, 2, 3] and len(failures) == len(srv.seen)


# -- shutdown, dead receivers ---------------------------------------------------------------

def test_stopping_during_backoff_returns_promptly(servers: MakeServer, senders: MakeSender,
                                                  stopping: threading.Event) -> None:
    srv = servers(default=Reply(503, {"Retry-After": "60"}))
    sender = senders(srv.url)
    t, out = in_thread(lambda: sender.send("b1", BODY, "identity"))
    wait_until(lambda: sender.state()["state"] == "backoff", 10, what="backoff")
    assert float(sender.state()["retry_delay_s"]) >= 60  # type: ignore[arg-type]
    t0 = time.monotonic()
    stopping.set()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(out.get("error"), ReceiverUnavailable)
    assert len(srv.seen) == 1  # no extra attempt once stopping is set


def test_dead_receiver_backs_off_and_logs_a_summary(servers: MakeServer, senders: MakeSender,
                                                    stopping: threading.Event,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spoolagent.sender")
    srv = servers(default=Reply(503))
    sender = senders(srv.url, in_flight=2, log_summary_every_s=0.3)
    threads = [in_thread(partial(sender.send, f"b{i}", BODY, "identity")) for i in range(2)]
    wait_until(lambda: sender.stats()["batches_retried"] >= 30, 20, what="many failed attempts")
    delay = sender.state()["retry_delay_s"]
    assert isinstance(delay, float) and delay <= 0.05  # capped at max_backoff_s
    wait_until(lambda: messages(caplog, "send still failing"), 10, what="a summary line")
    srv.default = Reply(201)
    for t, out in threads:
        t.join(10)
        assert "error" not in out, out
    attempts = sender.stats()["batches_retried"]
    # two threads, dozens of failed attempts: one WARNING at the start, a summary per period (and
    # on a loaded machine perhaps a second: the other thread's 503, sent before the switch to 201,
    # answered after the first thread's success ended the episode)
    assert 1 <= len(messages(caplog, "send failed")) <= 2
    summaries = messages(caplog, "send still failing")
    assert 1 <= len(summaries) < attempts / 4
    assert len(messages(caplog, "send recovered")) == len(messages(caplog, "send failed"))


def test_closed_sender_raises_receiver_unavailable(servers: MakeServer,
                                                   senders: MakeSender) -> None:
    srv = servers()
    sender = senders(srv.url)
    sender.close()
    with pytest.raises(ReceiverUnavailable):
        sender.send("b1", BODY, "identity")
    assert sender.state()["state"] == "stopped" and srv.seen == []


# -- concurrency ----------------------------------------------------------------------------

def test_in_flight_sends_overlap(servers: MakeServer, senders: MakeSender) -> None:
    cond = threading.Condition()
    active = [0, 0]  # now, max

    def hold_until_two() -> None:
        with cond:
            active[0] += 1
            active[1] = max(active)
            cond.notify_all()
            cond.wait_for(lambda: active[1] >= 2, timeout=5)
            active[0] -= 1

    srv = servers(hook=hold_until_two)
    sender = senders(srv.url, in_flight=2)
    threads = [in_thread(partial(sender.send, f"b{i}", BODY, "identity")) for i in range(2)]
    for t, out in threads:
        t.join(15)
        assert "error" not in out, out
    assert active[1] == 2
    assert len({r.client_port for r in srv.seen}) == 2
    # both connections stay pooled: more rounds open no new ones
    srv.hook = None
    for i in range(4):
        sender.send(f"c{i}", BODY, "identity")
    assert len({r.client_port for r in srv.seen}) == 2


# -- TLS ----------------------------------------------------------------------------------

def _make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl CLI; the
    venv has no ``cryptography``)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                                   "srv.pem"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=spoolagent test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a test CA")
    return _make_ca_and_cert(tmp_path)


def test_tls_with_ca_file(servers: MakeServer, senders: MakeSender, stopping: threading.Event,
                          tls_files: tuple[Path, Path, Path]) -> None:
    ca, cert, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = servers(tls=ctx)
    assert srv.url.startswith("https://")
    assert senders(srv.url, ca_file=str(ca)).send("b1", BODY, "identity").status == 201
    # without the CA file the system CAs do not know the test CA: unavailable, never rejected
    stopping.set()  # one attempt, no retries
    with pytest.raises(ReceiverUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        senders(srv.url).send("b2", BODY, "identity")
    assert len(srv.seen) == 1


def test_set_ca_file_applies_new_trust_to_the_next_attempt(servers: MakeServer, senders: MakeSender,
                                                          tls_files: tuple[Path, Path, Path]) -> None:
    # issue 15 #5: a reload applies [sender] ca_file (a rotated CA) without a restart
    ca, cert, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = servers(tls=ctx)
    sender = senders(srv.url)  # the system CAs: the test CA is unknown, attempts fail
    t, out = in_thread(lambda: sender.send("b1", BODY, "identity"))
    wait_until(lambda: sender.stats()["batches_retried"] >= 2, 10, what="failed TLS attempts")
    with pytest.raises(ConfigError):
        sender.set_ca_file(str(key.parent / "missing.pem"))  # refused, nothing changed
    sender.set_ca_file(str(ca))
    t.join(10)
    assert out["result"].status == 201 and len(srv.seen) == 1


def test_a_reload_that_adds_the_first_https_receiver_loads_the_system_cas(
        servers: MakeServer, senders: MakeSender, stopping: threading.Event,
        tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 17: a plain-http sender loads no CA at all; the first https:// receiver a reload adds
    # gets the system's CAs (here the test CA, through OpenSSL's SSL_CERT_FILE), not a client
    # that trusts nothing
    ca, cert, key = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = servers(tls=ctx)
    sender = senders(f"http://127.0.0.1:{free_port()}")
    sender.set_receivers([srv.url])
    stopping.set()  # one attempt, no retries
    assert sender.send("b1", BODY, "identity").status == 201


# -- the real receiver ----------------------------------------------------------------------

def test_against_the_real_receiver(receiver_factory: Callable[..., ReceiverProc],
                                   senders: MakeSender, tmp_path: Path) -> None:
    if any(importlib.util.find_spec(m) is None for m in ("receiver.app", "receiver.cli")):
        pytest.skip("the receiver has not landed yet")
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    rcv: ReceiverProc = receiver_factory("--token-file", str(token_file))
    sender = senders(rcv.url, token="t0ken")
    gz = gzip.compress(BODY)
    first = sender.send("real-1", gz, "gzip", lines=2)
    assert (first.status, first.stored, first.rejected, first.duplicate) == (201, 2, 0, False)
    again = sender.send("real-1", gz, "gzip", lines=2)
    assert (again.status, again.stored, again.duplicate) == (200, 2, True)
    import zstandard
    z = sender.send("real-2", zstandard.ZstdCompressor().compress(b"app 2024-01-02 z\n"), "zstd")
    assert z.status == 201 and z.stored == 1
    plain = sender.send("real-3", b"app 2024-01-03 p\nnot a valid line\n", "identity")
    assert (plain.stored, plain.rejected) == (1, 1)
    assert rcv.read_lines() == {"app_2024-01-02.dat": [b"hello", b"world", b"z"],
                                "app_2024-01-03.dat": [b"p"]}
    with pytest.raises(BatchRejected) as info:
        sender.send("real-4", b"app 2024-01-04 x\n", "gzip")  # not gzip: a bad body
    assert info.value.status == 400


def test_token_over_plain_http_off_loopback_is_warned_about(senders: MakeSender,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spoolagent.sender"):
        senders("http://127.0.0.1:1", "http://[::1]:1", "http://localhost:1", "https://10.0.0.5:1",
                token="secret")
        senders("http://10.0.0.5:8016", token=None)
        assert "clear text" not in caplog.text
        s = senders("http://10.0.0.5:8016", "http://127.0.0.1:1", token="secret")
        assert caplog.text.count("clear text") == 1 and "receiver=http://10.0.0.5:8016" in caplog.text
        s.set_receivers(["http://logs.example:8016"])
    assert "receiver=http://logs.example:8016" in caplog.text and "secret" not in caplog.text


def test_status_names_every_sender_state() -> None:
    # status.py spells the states out rather than import them; the gauge must cover each one
    assert metrics.SENDER_STATES == tuple(s.value for s in SenderState)

"""One collector process at a time: spawn it with a parent-death signal, signal its process
group, reap it, and run its reader threads (:class:`Run`).

The supervisor (``spoolagent.collect.supervisor``) decides *when* to run what; this module only knows how.

Parent-death signal: on Linux every collector is started through a tiny wrapper
(``python -I -S -c _WRAPPER``) that calls ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, checks that its
parent is still the agent, restores SIGPIPE/SIGXFSZ to their defaults and ``execv``s the collector
(same pid, so the supervisor's pid and process group stay valid). This keeps Python code out of the
window between ``fork`` and ``exec`` in the agent (``preexec_fn`` is unsafe with threads), at the
cost of ~10 ms per spawn. The kernel sends the signal when the *thread* that forked the wrapper
exits, so :func:`spawn` must be called from a thread that outlives its children (the supervisor
thread). The signal reaches the collector process itself, not processes it forks; those lose
their stdout reader and get EPIPE/SIGPIPE when they next write.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from spoolagent.collect.pipes import Counters, StderrLimiter, pump_stderr, pump_stdout
from spoolagent.errors import CollectorFailed

log = logging.getLogger(__name__)

_LINUX = sys.platform.startswith("linux")
_STATUS_TIMEOUT_S = 30.0
_PIPE_BYTES = 1024 * 1024
# exec errors that retrying cannot fix until the file changes
_PERMANENT_ERRNOS = frozenset({errno.ENOEXEC, errno.EACCES, errno.ENOENT, errno.ENOTDIR,
                               errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EPERM})

# argv: ppid status_fd program args...; reports "stage:errno" on status_fd and exits 127 on failure.
_WRAPPER = """\
import os, signal, sys
ppid, fd = int(sys.argv[1]), int(sys.argv[2])
os.set_inheritable(fd, False)
def fail(stage, err):
    os.write(fd, ("%s:%d" % (stage, err)).encode())
    os._exit(127)
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, 9, 0, 0, 0) != 0:
        fail("prctl", ctypes.get_errno())
except OSError as exc:
    fail("prctl", exc.errno or 0)
if os.getppid() != ppid:
    os._exit(137)
for s in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(s, signal.SIG_DFL)
try:
    os.execv(sys.argv[3], sys.argv[3:])
except OSError as exc:
    fail("exec", exc.errno or 0)
"""


class CollectorNotExecutable(CollectorFailed):
    """The collector file cannot be executed (no shebang, no permission, gone): retrying the same
    file is pointless until it changes."""


def spawn(argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (its own process group) with stdin from /dev/null and
    stdout/stderr as pipes; on Linux with PR_SET_PDEATHSIG=SIGKILL bound to the calling thread.

    Blocks until the program was exec'd (about 10 ms). Raises CollectorNotExecutable when exec
    fails for a reason tied to the file, CollectorFailed for any other failure to start.
    """
    if not _LINUX:
        return _popen(list(argv), env, ())
    if not sys.executable:
        raise CollectorFailed("cannot spawn: the agent's Python interpreter is unknown")
    status_r, status_w = os.pipe()  # both close-on-exec; pass_fds makes the child's copy inheritable
    try:
        cmd = [sys.executable, "-I", "-S", "-c", _WRAPPER, str(os.getpid()), str(status_w),
               *argv]
        proc = _popen(cmd, env, (status_w,))
        os.close(status_w)
        status_w = -1
        status = _read_status(status_r, proc)
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
    if not status:
        return proc
    proc.wait()
    _close_pipes(proc)
    stage, _, code = status.partition(":")
    err = int(code) if code.isdigit() else 0
    msg = f"cannot {stage} {argv[0]}: {os.strerror(err) if err else status}"
    if stage == "exec" and err in _PERMANENT_ERRNOS:
        raise CollectorNotExecutable(msg)
    raise CollectorFailed(msg)


def _popen(cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...]
           ) -> subprocess.Popen[bytes]:
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, close_fds=True,
                                pass_fds=pass_fds, start_new_session=True, bufsize=0)
    except OSError as exc:
        if exc.errno in _PERMANENT_ERRNOS:
            raise CollectorNotExecutable(f"cannot spawn {cmd[0]}: {exc}") from exc
        raise CollectorFailed(f"cannot spawn {cmd[0]}: {exc}") from exc
    _grow_pipe(proc)
    return proc


def _grow_pipe(proc: subprocess.Popen[bytes]) -> None:
    """A 1 MiB stdout pipe (Linux; best effort): a busy collector keeps writing while the reader
    thread is spooling the previous batch (compress + fsync'd commit), instead of stalling on a
    64 KiB pipe. Measured: see bench/RESULTS.md."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsz is None or proc.stdout is None:
        return
    try:
        fcntl.fcntl(proc.stdout.fileno(), setsz, _PIPE_BYTES)
    except OSError:  # over /proc/sys/fs/pipe-max-size, or the user's pipe quota: keep the default
        pass


def _read_status(fd: int, proc: subprocess.Popen[bytes]) -> str:
    """The wrapper's failure report, or "" once exec closed the status pipe."""
    deadline = time.monotonic() + _STATUS_TIMEOUT_S
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            _close_pipes(proc)
            raise CollectorFailed(f"spawn wrapper did not exec within {_STATUS_TIMEOUT_S}s")
        poller = select.poll()  # not select.select: the agent may hold fds past 1024
        poller.register(fd, select.POLLIN)
        if not poller.poll(remaining * 1000):
            continue
        chunk = os.read(fd, 256)
        if not chunk:
            return data.decode("ascii", "replace")
        data += chunk


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if the group is gone. Never raises.

    Callers signal a group while its leader is unreaped, or right after reaping it: a pgid is not
    reused while any process of the group is alive, so the signal cannot hit a stranger.
    """
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:  # a setuid collector, or the pgid was reused by someone else's
        log.warning("cannot signal collector group pgid=%d sig=%d err=%s", pgid, sig, exc)
        return False


class Run:
    """One process of a collector, from spawn until its stdout was handed over and ``on_exit``
    returned. Two daemon reader threads: stdout (``on_lines``/``on_overlong``, then, once the
    process was reaped, ``on_exit``) and stderr (the log). ``wake`` is called when stdout reaches
    EOF and when the run is finished. ``reap``, ``terminate`` and ``kill_if_due`` are for the
    supervisor thread only; the events and fields may be read from any thread."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], *,
                 on_lines: Callable[[bytes, int], None],
                 on_overlong: Callable[[int, bytes], None],
                 on_exit: Callable[[int], None], wake: Callable[[], None],
                 max_line_bytes: int, head_bytes: int, counters: Counters,
                 stderr_limiter: StderrLimiter) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.name = name
        self.pid = proc.pid
        self.started_mono = time.monotonic()
        self.returncode: int | None = None
        self.exited_mono: float | None = None
        self.eof_mono = 0.0
        self.exited = threading.Event()  # reaped
        self.eof = threading.Event()  # stdout at EOF, the last on_lines returned
        self.finished = threading.Event()  # on_exit returned
        self.term_sent = False
        self.kill_at: float | None = None
        self._proc = proc
        self._on_lines, self._on_overlong, self._on_exit = on_lines, on_overlong, on_exit
        self._wake = wake
        self._max_line_bytes, self._head_bytes = max_line_bytes, head_bytes
        self._counters = counters
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(proc.stdout,),
                             name=f"collector-stdout-{name}", daemon=True),
            threading.Thread(target=pump_stderr_closing, name=f"collector-stderr-{name}",
                             args=(proc.stderr, name, stderr_limiter, counters), daemon=True),
        ]
        # Linux: a pidfd turns readable when the process exits, so the supervisor is woken
        # for the exit instead of polling for it (an orphan may hold stdout open past the exit)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = -1
        self.exit_watched = pidfd >= 0
        if self.exit_watched:
            self._threads.append(threading.Thread(target=self._watch_exit, args=(pidfd,),
                                                  name=f"collector-exit-{name}", daemon=True))
        for t in self._threads:
            t.start()

    def _watch_exit(self, pidfd: int) -> None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll()
        finally:
            os.close(pidfd)
            self._wake()

    def reap(self, now: float, grace_s: float) -> bool:
        """True if the process exited (and was reaped) just now. Processes it left in its group
        get SIGTERM, and SIGKILL ``grace_s`` later (see :meth:`kill_if_due`)."""
        if self.exited.is_set():
            return False
        rc = self._proc.poll()
        if rc is None:
            return False
        self.returncode, self.exited_mono = rc, now
        # the leader is reaped: a pgid is not reused while its group has members, so a group that
        # still answers holds this run's orphans (which also keep its stdout open)
        if signal_group(self.pid, 0):
            log.info("collector left processes behind name=%s pgid=%d; terminating them",
                     self.name, self.pid)
            signal_group(self.pid, signal.SIGTERM)
            if self.kill_at is None:
                self.kill_at = now + grace_s
        else:
            self.kill_at = None
        self.exited.set()
        return True

    def terminate(self, now: float, grace_s: float) -> bool:
        """SIGTERM the process group once; SIGKILL follows ``grace_s`` later. False if the
        process is already gone or was sent SIGTERM before."""
        if self.exited.is_set() or self.term_sent:
            return False
        signal_group(self.pid, signal.SIGTERM)
        self.term_sent = True
        self.kill_at = now + grace_s
        return True

    def kill_if_due(self, now: float, hurry: bool = False) -> None:
        """SIGKILL the group if its grace period is over (or ``hurry``)."""
        if self.kill_at is None or (self.kill_at > now and not hurry):
            return
        if not self.exited.is_set():
            log.warning("collector did not stop after SIGTERM name=%s pid=%d; SIGKILL",
                        self.name, self.pid)
        signal_group(self.pid, signal.SIGKILL)
        self.kill_at = None

    def abandon(self) -> None:
        """SIGKILL and reap now (the supervisor failed). Blocks until the process is gone."""
        if not self.exited.is_set():
            signal_group(self.pid, signal.SIGKILL)
            self.returncode = self._proc.wait()
            self.exited.set()

    def _read_stdout(self, stdout: IO[bytes]) -> None:
        try:
            pump_stdout(stdout.fileno(), self.name, max_line_bytes=self._max_line_bytes,
                        head_bytes=self._head_bytes, on_lines=self._on_lines,
                        on_overlong=self._on_overlong, counters=self._counters)
        except Exception:
            log.exception("collector stdout reader failed name=%s", self.name)
        finally:
            stdout.close()
            self.eof_mono = time.monotonic()
            self.eof.set()
            self._wake()
        # on_exit comes after the last line and after the exit: the caller may commit and then
        # hand the next run its checkpoint
        self.exited.wait()
        try:
            self._on_exit(self.returncode if self.returncode is not None else -1)
        except Exception:
            log.exception("on_exit failed name=%s", self.name)
        finally:
            self.finished.set()
            self._wake()


def pump_stderr_closing(stderr: IO[bytes], name: str, limiter: StderrLimiter,
                        counters: Counters) -> None:
    """pump_stderr, then close the pipe; for a reader thread."""
    try:
        pump_stderr(stderr.fileno(), name, limiter, counters)
    except Exception:
        log.exception("collector stderr reader failed name=%s", name)
    finally:
        stderr.close()

"""off_loop: a request's decode and check on the executor, and the store's answer back on the
event loop in one wake-up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")


def off_loop(executor: Executor, call: Callable[[], Future[T]]) -> asyncio.Future[T]:
    """``call()`` on ``executor`` (decode and check), then the store's future it returns, handed
    back to the event loop in one wake-up: awaiting ``run_in_executor`` and then that future woke
    the loop twice per batch (issue 17: the loop's CPU per request)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def deliver(done: Future[T]) -> None:  # on the executor's or the store's thread
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody waits
            loop.call_soon_threadsafe(_settle, answer, done)

    def task() -> None:
        try:
            stored = call()
        except BaseException as exc:  # every failure answers the request (as run_in_executor did)
            stored = Future()
            stored.set_exception(exc)
        stored.add_done_callback(deliver)

    executor.submit(task)
    return answer


def _settle(answer: asyncio.Future[T], done: Future[T]) -> None:
    if answer.cancelled():
        return
    exc = done.exception()
    if exc is not None:
        answer.set_exception(exc)
    else:
        answer.set_result(done.result())

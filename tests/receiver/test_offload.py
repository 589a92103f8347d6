"""off_loop: the executor's work and the store's future it returns come back to the event loop as
one answer, a failure of either as the same exception."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from receiver.offload import off_loop


def _done(value: int) -> Future[int]:
    f: Future[int] = Future()
    f.set_result(value)
    return f


def _run(call: object) -> int:
    async def main() -> int:
        with ThreadPoolExecutor(1) as executor:
            return await off_loop(executor, call)  # type: ignore[arg-type]
    return asyncio.run(main())


def test_the_stores_answer_is_the_result() -> None:
    assert _run(lambda: _done(7)) == 7


def test_a_future_completed_later_on_another_thread_answers() -> None:
    later: Future[int] = Future()
    returned = threading.Event()

    def call() -> Future[int]:
        returned.set()
        return later

    def store() -> None:  # the store's committer: answers once the call has handed the future over
        assert returned.wait(30)
        later.set_result(9)

    committer = threading.Thread(target=store)
    committer.start()
    try:
        assert _run(call) == 9
    finally:
        committer.join(30)


def test_a_failing_call_raises_its_exception() -> None:
    def call() -> Future[int]:
        raise ValueError("bad body")
    with pytest.raises(ValueError, match="bad body"):
        _run(call)


def test_a_failed_store_future_raises_its_exception() -> None:
    def call() -> Future[int]:
        f: Future[int] = Future()
        f.set_exception(OSError("disk"))
        return f
    with pytest.raises(OSError, match="disk"):
        _run(call)

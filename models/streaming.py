"""Run a blocking token iterator in a thread and consume it from asyncio, with cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(make: Callable[[], Iterator[T]], cancel: threading.Event) -> AsyncIterator[T]:
    """Yield the items of `make()` (run in its own thread) as they come.

    Setting `cancel` (or closing this async generator) stops the thread's loop at its next item.
    An exception in the thread is re-raised here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def hand(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (its consumer was cancelled at shutdown): no one to tell
            cancel.set()

    def worker() -> None:
        try:
            for item in make():
                if cancel.is_set():
                    break
                hand(item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            hand(exc)
        finally:
            hand(_END)

    thread = threading.Thread(target=worker, daemon=True, name="token-stream")
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()

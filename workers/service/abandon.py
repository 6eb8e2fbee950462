"""Work a worker must finish even when the gRPC call that asked for it is cancelled (its client left)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def outlive_caller(
    work: concurrent.futures.Future[T] | asyncio.Future[T], on_abandoned: Callable[[T], object]
) -> T:
    """Await ``work`` shielded from the caller's cancellation; if the caller is cancelled, ``work`` goes on.

    Cancelling the work itself could leave it half done: an engine job never run, a thread that still
    reserves. Once abandoned work succeeds, nobody uses its result, so ``on_abandoned(result)`` gives
    back what it holds (called where ``work`` completes: a thread's future calls it from that thread,
    even after the caller's event loop has closed); a failure of abandoned work is dropped.
    """
    waiting = asyncio.wrap_future(work)  # ``work`` itself when it is an asyncio future already
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # its outcome is seen

        def settle(done: concurrent.futures.Future[T] | asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                on_abandoned(done.result())

        work.add_done_callback(settle)  # type: ignore[arg-type]  # either kind of future calls it with itself
        raise

"""Kernel updates (routes, the nft anti-spoofing set) run one at a time, in order.

A later update must never overtake an earlier one (a route removed before it was
added would stay), and a task must be referenced until done, or it may be collected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class KernelQueue:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def run(
        self, work: Coroutine[Any, Any, None], then: Callable[[], None] | None = None
    ) -> asyncio.Task[None]:
        """Queue ``work`` after every earlier update; ``then`` runs once it is done."""

        async def serialized() -> None:
            async with self._lock:
                await work

        task = asyncio.get_running_loop().create_task(serialized())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if then is not None:
            task.add_done_callback(lambda _t: then())
        return task

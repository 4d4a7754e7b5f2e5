"""Background tasks with strong references, drained on shutdown (never fire-and-forget)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from proxy.errors import Refusal

log = structlog.get_logger("proxy.tasks")


class Tasks:
    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), Refusal):  # an expected outcome its awaiter answers
            return
        log.error("task_failed", task=task.get_name(), exc_info=task.exception())

    @property
    def pending(self) -> int:
        return len(self._running)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for every running task, and for those they start meanwhile (a forward that
        ends starts its settlement, which must land before the store closes)."""
        deadline_s = asyncio.get_running_loop().time() + timeout_s
        while self._running:
            left_s = deadline_s - asyncio.get_running_loop().time()
            if left_s <= 0:
                return
            await asyncio.wait(set(self._running), timeout=left_s)

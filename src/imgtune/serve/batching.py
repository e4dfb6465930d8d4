"""Dynamic batching: images of concurrent requests gathered into one model batch.

Each decoded image waits in a queue; one task takes the first, then whatever else arrives within
``max_wait_ms`` (never more than ``max_batch`` images), and runs the batch through the predictor's own
``run_batch`` (the function ``imgtune predict`` runs its batches with) on the one model thread, off the
event loop. While a batch runs, the next one gathers: under load batches fill without waiting. Everything
else that uses the model (explanations) runs on the same thread (:meth:`Batcher.call`), so the model is
never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Batcher:
    """``run_batch(list of loaded images) -> probabilities (one row each)``; ``on_batch(size, seconds)``
    is told of every batch (metrics). :meth:`start` inside the event loop, :meth:`stop` at shutdown."""

    def __init__(self, run_batch: Callable[[list], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, float], None] | None = None):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgtune-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._gather_forever(), name="imgtune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def probabilities(self, inputs: list) -> np.ndarray:
        """One row of probabilities per loaded image, in order (rows may be computed in different batches)."""
        if not inputs:
            return np.zeros((0, 0))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        for item, future in zip(inputs, futures):
            self._queue.put_nowait((item, future))
        return np.stack(await asyncio.gather(*futures))

    async def call(self, function: Callable[..., Any], *args) -> Any:
        """``function(*args)`` on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _gather_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            await self._run([item for item in batch if not item[1].done()])

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        if not batch:  # every request in it was cancelled (its client went away)
            return
        start = time.perf_counter()
        try:
            probs = await self.call(self.run_batch, [item for item, _ in batch])
        except Exception as exc:  # the model failed: every request in the batch is told, the loop goes on
            log.exception("a batch of %d image(s) failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.on_batch(len(batch), time.perf_counter() - start)
        for row, (_, future) in zip(probs, batch):
            if not future.done():
                future.set_result(row)

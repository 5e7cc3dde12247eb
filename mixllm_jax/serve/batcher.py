"""Micro-batching on the event loop: collect requests for a few milliseconds, run them as one call.

A request submits one item per prompt; a single collector task takes the first waiting item,
gathers more until `max_batch` items or `window_s` after that first item arrived (an item that
already waited through the previous call goes at once) -- but waits only while more items are on
their way (`expected`: announced by requests still being read or tokenized), so a lone request
is not held for the window -- and hands the batch to `run_batch` on a
one-thread executor, so the loop keeps accepting while the jitted call runs and only one call
runs at a time. The number of items accepted but not finished is bounded by `queue_limit`:
`submit` raises `Overloaded` past it instead of letting memory grow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass
class Item:
    payload: Any
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    """run_batch(payloads: list) -> list of results (same order), called on `executor`.

    An exception raised by run_batch fails every item of that batch; a result that is an
    Exception instance fails only its item.
    """

    def __init__(self, run_batch: Callable[[list], Sequence], executor: concurrent.futures.Executor,
                 window_s: float = 0.003, max_batch: int = 64, queue_limit: int = 1024,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if queue_limit < max_batch:
            raise ValueError(f"queue_limit ({queue_limit}) must be >= max_batch ({max_batch})")
        if not window_s >= 0:
            raise ValueError(f"window must be >= 0 s, got {window_s}")
        self.run_batch = run_batch
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self.queue_limit = queue_limit
        self.on_batch = on_batch
        self.pending = 0  # accepted, not finished (queued + in the running batch)
        self.expected = 0  # items announced as on their way (see `expect`), not yet submitted
        self._queue: asyncio.Queue[Item] | None = None
        self._task: asyncio.Task | None = None
        self._busy_s = 0.0  # EMA of a batch's run time: the Retry-After hint
        self.batches = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="micro-batcher")

    async def stop(self, timeout_s: float = 120.0) -> None:
        """Finish what was accepted (waiting at most timeout_s), then stop."""
        if self._task is None:
            return
        deadline = time.perf_counter() + timeout_s
        while self.pending and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    def retry_after(self) -> float:
        return max(1.0, round(self._busy_s * self.pending / max(self.max_batch, 1), 1))

    @contextlib.contextmanager
    def expect(self, n: int):
        """Announce n items that will be submitted after this block (e.g. prompts being tokenized):
        a batch being collected waits for them (up to the window) instead of leaving without them."""
        self.expected += n
        try:
            yield
        finally:
            self.expected -= n

    async def submit(self, payloads: list) -> list:
        """Queue the payloads (one item each) and wait for all their results."""
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        n = len(payloads)
        if self.pending + n > self.queue_limit:
            raise Overloaded(f"request queue is full ({self.pending} of {self.queue_limit} prompts waiting); "
                             f"retry later", self.retry_after())
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [Item(p, loop.create_future(), now) for p in payloads]
        self.pending += n
        for it in items:
            self._queue.put_nowait(it)
        return list(await asyncio.gather(*(it.future for it in items)))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            first = await q.get()
            batch = [first]
            deadline = first.enqueued + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                timeout = deadline - time.perf_counter()
                if timeout <= 0 or self.expected <= 0:  # the window is up, or nothing is on its way
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), timeout))
                except asyncio.TimeoutError:
                    break
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [it.payload for it in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001 - every item learns of the failure
                if isinstance(e, asyncio.CancelledError):
                    for it in batch:
                        if not it.future.done():
                            it.future.cancel()
                    self.pending -= len(batch)
                    raise
                log.exception("routing batch of %d failed", len(batch))
                results = [e] * len(batch)
            dt = time.perf_counter() - t0
            self._busy_s = dt if self.batches == 0 else 0.9 * self._busy_s + 0.1 * dt
            self.batches += 1
            self.pending -= len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), dt)
            for it, r in zip(batch, results):
                if it.future.done():  # the client went away
                    continue
                if isinstance(r, BaseException):
                    it.future.set_exception(r)
                else:
                    it.future.set_result(r)

"""Micro-batching: concurrent requests share one model call, run off the event loop.

Each request submits its items and awaits a future. One worker thread takes the first waiting
request, keeps collecting for at most `max_wait_s` or until `max_batch` items, runs the batch
function once, and hands each request its slice of the results. A plain `queue.Queue` and
`concurrent.futures.Future` keep the worker independent of any particular event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BatcherClosedError", "MicroBatcher", "QueueFullError"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """More items are waiting than the batcher accepts; the client should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed (server shutting down)."""


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    future: Future[list[R]] = field(default_factory=Future)


class MicroBatcher(Generic[T, R]):
    """Runs `fn(items) -> results` (same length, same order) on batches gathered from many callers.

    `lock`, when given, is held around every call of `fn`, so several batchers can share one model
    whose hooks (Grad-CAM) must never see another batcher's forward pass. `on_idle`, when given, runs
    after a batch that leaves nothing waiting: the end of a burst, when the server returns memory.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = 16, max_wait_s: float = 0.01,
                 max_queue: int = 256, lock: threading.Lock | None = None, name: str = "batcher",
                 on_idle: Callable[[], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch and max_queue must be positive and max_wait_s >= 0, got "
                             f"{max_batch}, {max_queue}, {max_wait_s}")
        self.fn = fn
        self.on_idle = on_idle
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # items per recent model call, for tests and benchmarks
        self._lock = lock or threading.Lock()
        self._jobs: queue.Queue[_Job[T, R] | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> Future[list[R]]:
        """Queue items; the future resolves to their results, or to the exception the batch raised."""
        if self._closed:
            raise BatcherClosedError("The inference worker is shut down")
        with self._pending_lock:
            if self._pending + len(items) > self.max_queue:
                raise QueueFullError(f"{self._pending} images are already waiting (limit {self.max_queue}); "
                                     "retry in a moment")
            self._pending += len(items)
        job: _Job[T, R] = _Job(list(items))
        self._jobs.put(job)
        return job.future

    async def run(self, items: Sequence[T]) -> list[R]:
        """Await the results without blocking the event loop."""
        if not items:
            return []
        return await asyncio.wrap_future(self.submit(items))

    def close(self) -> None:
        """Finish the queued work, then stop the worker thread."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def _collect(self, first: _Job[T, R]) -> tuple[list[_Job[T, R]], bool]:
        """`first` plus whatever arrives within max_wait_s, up to max_batch items; True if told to stop."""
        jobs, size = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            size += len(job.items)
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            self._process(jobs)
            if self.on_idle is not None and self._jobs.empty():
                self.on_idle()

    def _process(self, jobs: list[_Job[T, R]]) -> None:
        items = [item for job in jobs for item in job.items]
        with self._pending_lock:
            self._pending -= len(items)
        try:
            with self._lock:
                results = list(self.fn(items))
            if len(results) != len(items):
                raise RuntimeError(f"Batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # every waiting request gets the failure; the worker keeps serving
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batch_sizes.append(len(items))
        start = 0
        for job in jobs:
            job.future.set_result(results[start:start + len(job.items)])
            start += len(job.items)

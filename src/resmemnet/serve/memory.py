"""Bounding and returning the server's memory: a budget of decoded pixels, and malloc_trim after bursts.

A 6000x6000 PNG is 105 kB on the wire but 108 MB once decoded, so upload size limits alone do not
bound memory: decoding takes pixels from a budget shared by all requests. glibc keeps freed memory
in its per-thread arenas, so after a large decode the server hands it back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PixelBudget", "release_memory"]


class PixelBudget:
    """A weighted semaphore: decoding waits until the pixels it needs are free.

    One image never waits for more than the whole budget, so an image larger than the budget is
    decoded alone rather than never.
    """

    def __init__(self, pixels: int):
        if pixels < 1:
            raise ValueError(f"the pixel budget must be at least 1, got {pixels}")
        self.pixels = pixels
        self.in_use = 0
        self._free = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Block until `pixels` (capped at the budget) are free, and hold them for the block."""
        pixels = min(max(pixels, 0), self.pixels)
        with self._free:
            self._free.wait_for(lambda: self.in_use + pixels <= self.pixels)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._free:
                self.in_use -= pixels
                self._free.notify_all()


def _malloc_trim() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim(0)); a no-op elsewhere."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

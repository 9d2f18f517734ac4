"""Bounding and returning the server's memory: a budget of decoded pixels, and malloc_trim after bursts.

A 6000x6000 PNG is 105 kB on the wire but 108 MB once decoded, so upload size limits alone do not
bound memory: decoding takes pixels from a budget shared by all requests. glibc keeps freed memory
in its per-thread arenas, so the server caps the arenas and has every large buffer (decoded
images, activations) mmapped, which returns it to the system when freed, and trims the heap
after bursts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MMAP_THRESHOLD", "PixelBudget", "release_memory", "tune_allocator"]

# glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20  # buffers from 1 MiB up (a 224x224 float image is 0.6 MB) get their own mapping
_ARENA_MAX = 2  # threadpool decoders and the batcher would otherwise each grow an arena of their own


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


def _glibc(name: str) -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim or mallopt)
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")


def tune_allocator() -> bool:
    """Cap glibc's arenas and mmap every buffer of MMAP_THRESHOLD or more; False where that is not glibc.

    glibc raises its mmap threshold to 32 MB after the first large free, after which a ResNet's
    activations (6 to 50 MB a batch) come from arenas that keep them once freed; a fixed threshold
    keeps every such buffer in its own mapping, unmapped on free.
    """
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_ARENA_MAX, _ARENA_MAX)) and bool(_MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim(0)); a no-op elsewhere."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

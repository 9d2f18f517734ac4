"""uvicorn's h11 HTTP protocol with a deadline for the request head.

uvicorn times out idle keep-alive connections but not a request head that never finishes: a client
that sends a few header bytes, or one byte every few seconds, holds its connection for as long as it
likes. No ASGI middleware can see such a connection (the app is called once the head is complete),
so the deadline lives in the protocol.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderTimeoutH11Protocol", "with_header_timeout"]


class HeaderTimeoutH11Protocol(H11Protocol):
    """Closes the connection when a request head is not complete `header_timeout_s` after the
    connection opened or the previous response finished."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _start_head_deadline(self) -> None:
        self._cancel_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        # IDLE: no complete request head since the deadline started (a request in progress is never cut).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(seconds: float) -> functools.partial[HeaderTimeoutH11Protocol]:
    """The protocol for uvicorn's `http=` setting; a partial of a module-level class, so that it
    pickles into `--workers N` processes."""
    if seconds <= 0:
        raise ValueError(f"the header timeout must be positive, got {seconds}")
    return functools.partial(HeaderTimeoutH11Protocol, header_timeout_s=seconds)

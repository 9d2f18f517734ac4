"""ASGI middleware that guards every request: body size, body arrival time, and security headers.

They are plain ASGI wrappers rather than route code, so they also cover 404s, validation errors and
the API docs, and they act before FastAPI reads a byte of the body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

__all__ = ["DOCS_PATHS", "SECURITY_HEADERS", "BodyLimit", "BodyTimeout", "SecurityHeaders", "security_headers"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The page loads only its own script and style; photos are shown from blob: URLs, heatmaps from data: URLs.
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
             "frame-ancestors 'none'; form-action 'self'")
# Swagger UI (served from this server, see app.py) starts from an inline script and sets inline styles.
# Nothing may still be loaded from, or sent to, another origin.
_DOCS_CSP = _PAGE_CSP + "; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"
DOCS_PATHS = frozenset({"/docs"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": _PAGE_CSP,
}


def security_headers(path: str) -> dict[str, str]:
    """The headers every response to `path` carries."""
    return {**SECURITY_HEADERS, "Content-Security-Policy": _DOCS_CSP if path in DOCS_PATHS else _PAGE_CSP}


class SecurityHeaders:
    """Adds `security_headers(path)` to every HTTP response that does not set them itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in security_headers(scope["path"]).items()]

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Refuses a request body over the limit from its Content-Length, before anything is read.

    A chunked body without Content-Length is refused too (411), so the limit cannot be bypassed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            status, detail = 0, ""
            if length is None and b"transfer-encoding" in headers:
                status, detail = 411, "Send a Content-Length header; chunked uploads are not accepted"
            elif length is not None and not length.isdigit():
                status, detail = 400, "Content-Length must be a non-negative integer"
            elif length is not None and int(length) > self.max_bytes:
                status, detail = 413, (f"Request body is {int(length):,} bytes, over the limit of {self.max_bytes:,}; "
                                       "send fewer or smaller files")
            if status:
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTimeout:
    """Answers 408 and closes the connection when a request body is not complete within `seconds`.

    A stalled upload would otherwise hold its connection, and its buffered part, for as long as the
    client likes. The deadline counts from the start of the request; reading is done by FastAPI,
    which passes an HTTPException raised while reading the body on to its error handling.
    """

    def __init__(self, app: ASGIApp, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def receive_before_deadline() -> MutableMapping[str, Any]:
            nonlocal body_done
            if body_done:  # afterwards receive() only waits for a disconnect, which is no upload
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The request body did not arrive within {self.seconds:g} s; "
                                         "check the connection and send it again",
                                    headers={"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_before_deadline, send)

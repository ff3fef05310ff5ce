"""uvicorn's HTTP/1.1 protocol with a deadline on a request's line and headers.

uvicorn bounds the idle time between requests (keep-alive) but not the time a request's headers
may take: every byte received resets its only timer, so a client sending one byte every few
seconds holds a connection open indefinitely, and a few hundred such clients exhaust the server.
The body is bounded by the app itself (app.py's body timeout); the headers arrive before the app
is called, so they are bounded here.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        # IDLE: the next request's headers have not all arrived (h11 leaves IDLE on a complete Request)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # a kept-alive connection gets the same deadline for its next request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

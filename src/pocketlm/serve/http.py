"""uvicorn's HTTP/1.1 protocol with a deadline on a request's line and headers.

uvicorn bounds the idle time between requests (keep-alive) but not the time a request's headers
may take: every byte received resets its only timer, so a client sending one byte every few
seconds holds a connection open indefinitely, and a few hundred such clients exhaust the server.
The body is bounded by the app itself (app.py's body timeout); the headers arrive before the app
is called, so they are bounded here.

Built on uvicorn's httptools protocol, not its h11 one: every streamed token is one write per
client, and h11 frames each in Python. Measured (16 streaming clients through `serve`, Q4_0 file,
3 rounds alternated): the front's CPU per token 0.27-0.28 -> 0.24-0.26 ms and the server's total
tokens/s 296-303 -> 313-322.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
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
        # uvicorn makes a request's cycle once its headers are all in: with none, or only finished
        # ones (a pipelined request's cycle is the newest), the next request's headers are late
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # a kept-alive connection gets the same deadline for its next request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

"""The HTTP protocol the server runs with: uvicorn's httptools protocol with connection timeouts."""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools (llhttp) protocol with the bounds it lacks: a request's line and headers
    must all arrive within `header_timeout_s` of its first byte (or of the connection, for the first
    request) and hold at most `max_head_bytes` (else 400 and the connection is closed), and its body
    must arrive within `body_timeout_s` (+1 s, after which the app has answered 408) of its headers;
    otherwise the connection is closed. Idle keep-alive connections are closed by uvicorn's
    timeout_keep_alive. Together they bound how long, and with how much, a slow client holds a
    connection. (httptools rather than h11: its C parser halves the server's HTTP cost per request.)"""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_head_bytes = 64 * 1024

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._phase, self._timer, self._head_bytes = None, None, 0
        self._arm("headers", self.header_timeout_s)

    def _arm(self, phase: str | None, after: float | None) -> None:
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._phase, self._timer = phase, None
        if phase is not None:
            self._timer = self.loop.call_later(after, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._timer = None
        if not self.transport.is_closing():
            log.info("closing a connection from %s: its request %s did not arrive in time", self.client, phase)
            self.transport.close()

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:  # raised in a parser callback: uvicorn answers 400, closes
            raise ValueError(f"request line and headers over {self.max_head_bytes} bytes")

    # parser callbacks (llhttp calls them from feed_data, in the order the bytes arrive)
    def on_message_begin(self) -> None:  # the first byte of a request
        super().on_message_begin()
        self._head_bytes = 0
        self._arm("headers", self.header_timeout_s)  # (kept as it is when already armed for this request)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if not self.transport.is_closing():
            self._arm("body", self.body_timeout_s + 1.0)  # a request without a body completes at once

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._arm(None, None)

    def connection_lost(self, exc) -> None:
        self._arm(None, None)
        super().connection_lost(exc)

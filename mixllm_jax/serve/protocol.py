"""The HTTP protocol the server runs with: uvicorn's httptools protocol with connection timeouts and
connection caps (per client address, and evicting idle connections at the server's cap)."""

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
    connection. (httptools rather than h11: its C parser halves the server's HTTP cost per request.)

    Connection caps: one client address holds at most `max_per_client` connections, and the server
    at most `max_connections` (uvicorn's limit_concurrency: past it a request gets 503). A new
    connection over either cap evicts the oldest *idle* connection in its scope (one with no request
    being answered: nothing sent yet, headers still arriving, or an idle keep-alive); a connection
    whose request is being answered is never evicted. When the client's connections are all busy the
    new one is closed; when the server's are, uvicorn answers its request 503. So idle or half-open
    connections, however many, cannot keep another request from being served: the newest connection
    evicts the oldest idle one."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_head_bytes = 64 * 1024
    max_per_client = 256
    max_connections = 1024

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._phase, self._timer, self._head_bytes = None, None, 0
        self._opened, self._ip = self.loop.time(), (self.client or ("?", 0))[0]
        self._arm("headers", self.header_timeout_s)
        self._admit()

    # ---- connection caps ----------------------------------------------------------------------

    def _per_client(self) -> dict:
        st = self.server_state
        if not hasattr(st, "mixllm_per_client"):
            st.mixllm_per_client = {}
        return st.mixllm_per_client

    def _idle(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def _evict_oldest(self, same_client: bool) -> bool:
        """Close the oldest idle connection (of this client if `same_client`) other than this one."""
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedHttpProtocol)
                and (not same_client or c._ip == self._ip) and c._idle() and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._opened)
        log.info("closing an idle connection from %s: %s at its connection cap", oldest._ip,
                 "the client is" if same_client else "the server is")
        oldest._release()
        oldest.transport.close()
        return True

    def _release(self) -> None:
        """Stop counting this connection (once): against its client's cap, and the server's."""
        self.connections.discard(self)
        if getattr(self, "_counted", False):
            self._counted = False
            n = self._per_client()
            n[self._ip] -= 1
            if n[self._ip] <= 0:
                del n[self._ip]

    def _admit(self) -> None:
        n = self._per_client()
        n[self._ip] = n.get(self._ip, 0) + 1
        self._counted = True
        if n[self._ip] > self.max_per_client and not self._evict_oldest(same_client=True):
            log.info("refusing a connection from %s: its %d connections are all busy", self._ip, n[self._ip] - 1)
            self._release()
            self.transport.close()
            return
        while len(self.connections) >= self.max_connections and self._evict_oldest(same_client=False):
            pass

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
        self._release()
        super().connection_lost(exc)

"""Issue 24 against the keyed test server (conftest.secure_env): load is booked by calls that
happen (item 2: /v1/route books only when asked, per key, expiring), and idle connections cannot
starve other requests (item 8). On loopback every client is 127.0.0.1, so the flood and the
legitimate request share an address: what lets the request through is that idle connections are
evicted oldest first, never one being answered."""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("httpx")

from serve_helpers import PROMPT  # noqa: E402

pytestmark = pytest.mark.slow

OTHER = [f"Question {i}: what is {i} times {i + 3}? Explain step by step." if i % 2 else
         f"Write a short poem about the number {i}." for i in range(8)]
WAIT_S = 30  # a bound on waits, not a performance assertion


@pytest.fixture
def srv(secure_env):
    return secure_env["server"]


def other_key_view(srv, keys) -> tuple[list, dict]:
    """The "client" key's decisions on 8 prompts (no booking) and each LLM's predicted wait."""
    r = srv.post("/v1/route", {"prompt": OTHER}, key=keys["client"])
    assert r.status_code == 200, r.text
    routes = r.json()["routes"]
    return [x["model"] for x in routes], {m: e["wait"] for m, e in routes[0]["explanation"].items()}


def pinned_routes(srv, keys, model: str, n: int, **body) -> list[dict]:
    """n routes pinned to `model` by the "route" key, 8 prompts a request (the server's queue limit)."""
    out = []
    for i in range(0, n, 8):
        prompts = [f"{PROMPT} ({j})" for j in range(i, min(n, i + 8))]
        r = srv.post("/v1/route", {"prompt": prompts, "model": model, **body}, key=keys["route"])
        assert r.status_code == 200, r.text
        out += r.json()["routes"]
    return out


def test_routes_book_load_only_when_asked_per_key_and_expiring(secure_env, srv):
    keys, models = secure_env["keys"], secure_env["models"]
    before, waits = other_key_view(srv, keys)
    target = before[0]
    free = pinned_routes(srv, keys, target, 200)  # 200 pinned routes, no booking asked
    assert all(r["model"] == target and "booked" not in r for r in free)
    after, waits_after = other_key_view(srv, keys)
    assert after == before and waits_after == waits  # another key's decisions did not move
    assert srv.get("/healthz").json()["route_bookings"] == 0

    asked = pinned_routes(srv, keys, target, 16, book_load=True)  # booking asked: 12 per key (the cap)
    assert [r["booked"] for r in asked] == [True] * 12 + [False] * 4
    _, booked = other_key_view(srv, keys)
    assert booked[target] > 0 and srv.get("/healthz").json()["route_bookings"] == 12
    assert all(booked[m] == waits[m] for m in models if m != target)  # only the booked LLM is loaded

    deadline = time.monotonic() + WAIT_S  # the bookings expire (--booking-ttl-s 2)
    while other_key_view(srv, keys)[1][target] > 0 or srv.get("/healthz").json()["route_bookings"]:
        assert time.monotonic() < deadline, "route bookings did not expire"
        time.sleep(0.2)
    assert pinned_routes(srv, keys, target, 1, book_load=True)[0]["booked"]  # the key may book again


def test_idle_connections_cannot_starve_a_request(secure_env, srv):
    """Issue 24 #9: 1,100 half-open connections made other requests 503. Now, on one address: the
    newest connection evicts the oldest idle one (past --max-connections-per-ip 256, and past
    --max-connections 1024), so a request on a new connection is answered."""
    keys = secure_env["keys"]
    flood = []
    try:
        for _ in range(1100):  # connected, nothing sent
            flood.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        r = srv.post("/v1/route", {"prompt": PROMPT}, key=keys["client"])
        assert r.status_code == 200, r.text
        assert srv.get("/healthz", key="").status_code == 200 and srv.get("/readyz", key="").json() == {
            "status": "ready", "journal_torn_tails": 0}
        for s in flood:
            s.setblocking(False)

        def open_count() -> int:
            n = 0
            for s in flood:
                try:
                    n += s.recv(1) != b""
                except BlockingIOError:
                    n += 1
                except OSError:
                    pass
            return n
        deadline = time.monotonic() + WAIT_S
        while open_count() > 256:  # the server holds at most 256 of one address's connections
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for s in flood:
            s.close()

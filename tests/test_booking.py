"""Load booked on request (issue 24, item 2) and health/readiness (item 8), without a server:
serve/booking.Bookings on explicit clocks, and the app's /healthz and /readyz before it starts."""

from __future__ import annotations

import types

import numpy as np
import pytest

from mixllm_jax.serve.booking import Bookings
from mixllm_jax.serve.compute import RouteReq

K, C = 2, 2
STATE = types.SimpleNamespace(ttft=np.array([1.0, 1.0], np.float32), tokens_per_s=np.array([10.0, 10.0], np.float32))
GEN = np.zeros(K, np.int64)


def req(key: str, kind: str = "route", book: bool = True) -> RouteReq:
    return RouteReq([1], 1, None, None, None, book, kind, key, asked_book=book and kind == "route")


def book_batch(b: Bookings, reqs, free_at, clock, arm=0, tokens=90.0):
    """Admit and record a batch whose rows all choose `arm` with `tokens` predicted (10 s each)."""
    b.admit(reqs)
    book = np.array([r.book for r in reqs])
    toks = np.full((len(reqs), K), tokens, np.float32)
    b.record(reqs, book, np.full(len(reqs), arm), toks, STATE, free_at, clock, GEN)
    fa = np.array(free_at, np.float32)
    for r in reqs:  # what latency.assign_sequential books: the earliest-free slot, in row order
        if r.book:
            c = int(np.argmin(fa[arm]))
            fa[arm, c] = max(fa[arm, c], clock) + 10.0
    return fa


def test_route_bookings_are_capped_per_key_and_chat_is_not():
    b = Bookings(ttl_s=60, per_key=3)
    reqs = [req("a") for _ in range(5)] + [req("b"), req("a", kind="chat"), req("a", book=False)]
    book_batch(b, reqs, np.zeros((K, C), np.float32), 0.0)
    assert [r.book for r in reqs] == [True] * 3 + [False] * 2 + [True, True, False]
    assert b.held("a") == 3 and b.held("b") == 1  # the chat call books, untracked here
    more = [req("a"), req("b")]
    b.admit(more)
    assert [r.book for r in more] == [False, True]  # a's cap holds across batches


def test_bookings_expire_and_release_what_is_left_of_them():
    b = Bookings(ttl_s=5, per_key=8)
    fa = book_batch(b, [req("a") for _ in range(4)], np.zeros((K, C), np.float32), 0.0)
    np.testing.assert_allclose(fa[0], [20.0, 20.0])  # 4 bookings of 10 s on 2 slots: 10 s of wait
    assert b.expire(fa, 4.0, GEN) is None and b.held("a") == 4  # not yet expired
    freed = b.expire(fa, 5.0, GEN)  # at the ttl: what is left of each is taken off
    np.testing.assert_allclose(freed[0], [5.0, 5.0])
    assert b.held("a") == 0 and b.expire(freed, 6.0, GEN) is None
    np.testing.assert_array_equal(freed[1], fa[1])  # the other LLM is untouched


def test_ended_bookings_and_removed_llms_are_forgotten():
    b = Bookings(ttl_s=100, per_key=8)
    fa = book_batch(b, [req("a"), req("a")], np.zeros((K, C), np.float32), 0.0)
    assert b.expire(fa, 11.0, GEN) is None and b.held("a") == 0  # ended by themselves: nothing to release
    fa = book_batch(b, [req("a")], fa, 20.0)
    assert b.expire(fa, 21.0, np.array([1, 0])) is None and b.held("a") == 0  # its LLM's slot was reused


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="booking_ttl_s"):
        Bookings(ttl_s=0)
    with pytest.raises(ValueError, match="max_booked_per_key"):
        Bookings(per_key=-1)


def test_healthz_is_liveness_for_anyone_and_readyz_waits_for_the_state(tmp_path):
    """Before its lifespan has run (the state not restored, nothing replayed) the app is alive and
    not ready; an invalid key does not make /healthz a 401."""
    import json

    from starlette.testclient import TestClient

    from mixllm_jax.serve.app import create_app
    from mixllm_jax.serve.auth import hash_key
    from mixllm_jax.serve.options import ServeConfig

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "k", "sha256": hash_key("mxk_k"), "roles": ["route"]}]}))
    app = create_app(ServeConfig.of(checkpoint=str(tmp_path / "none"), api_keys=str(keys)))
    client = TestClient(app)  # not entered: no lifespan, the service is not started
    for auth in ({}, {"authorization": "Bearer wrong"}, {"authorization": "garbage"}, {"authorization": "Bearer mxk_k"}):
        h = client.get("/healthz", headers=auth)
        assert (h.status_code, h.json()) == (200, {"status": "ok"}), auth
        r = client.get("/readyz", headers=auth)
        assert (r.status_code, r.json()["status"], r.headers["retry-after"]) == (503, "starting", "1")
    assert client.post("/v1/route", json={"prompt": "x"}, headers={"authorization": "Bearer wrong"}).status_code == 401

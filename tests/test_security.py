"""Regression tests of issue 12 ("safe to put on a network"), one or more per finding, against a
server with API keys (conftest.secure_env: keys, the stub on the allow-list, --max-llms 14, 2 s
header and body timeouts). The tests run in file order; the last ones restart the server.

Every rejected request is checked to leave no trace: the journal sequence number and the admin
digest of the learned state (GET /healthz?digest=1) are the same before and after it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import BACKEND_KEY, SERVER_SECRET  # noqa: E402
from serve_helpers import JSON, PROMPT, REPO  # noqa: E402

pytestmark = pytest.mark.slow

NEW = {"name": "extra-llm", "price_in_per_mtok": 0.5, "price_out_per_mtok": 1.5, "prior": 0.5}


@pytest.fixture
def env(secure_env):
    return secure_env


@pytest.fixture
def srv(secure_env):
    return secure_env["server"]


def snapshot(srv) -> tuple:
    """(journal seq, digest of the learned state, model names): what a rejected request must not change."""
    h = srv.get("/healthz?digest=1").json()
    return h["journal_seq"], h["state_digest"], tuple(h["models"]), h["capacity"]


def assert_rejected(srv, resp, status, needle=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str)
    if needle is not None:
        assert needle in err["message"], err["message"]


def stub_requests(env) -> list:
    return httpx.get(env["stub"] + "/_requests", timeout=10).json()


# ---- 1. authentication, roles, content type --------------------------------------------------


def test_keys_and_roles(env, srv):
    k = env["keys"]
    before = snapshot(srv)
    for key, path, body, status, code in [
        ("", "/v1/route", {"prompt": PROMPT}, 401, "invalid_api_key"),
        ("not-a-key", "/v1/route", {"prompt": PROMPT}, 401, "invalid_api_key"),
        ("", "/v1/models", NEW, 401, "invalid_api_key"),
        (k["route"], "/v1/models", NEW, 403, "insufficient_permissions"),
        (k["client"], "/v1/models", NEW, 403, "insufficient_permissions"),
        (k["feedback"], "/v1/route", {"prompt": PROMPT}, 403, "insufficient_permissions"),
        (k["route"], "/v1/feedback", {"request_id": "req-x", "quality": 1}, 403, "insufficient_permissions"),
    ]:
        r = srv.post(path, body, key=key)
        assert_rejected(srv, r, status)
        assert r.json()["error"]["code"] == code
        assert r.json()["error"]["type"] == ("authentication_error" if status == 401 else "permission_error")
        if status == 401:
            assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(srv.url + "/v1/route", json={"prompt": PROMPT}, headers={"authorization": "Basic abc"}, timeout=30)
    assert r.status_code == 401 and "malformed Authorization" in r.json()["error"]["message"]
    assert srv.delete("/v1/models/" + env["models"][0], key=k["route"]).status_code == 403
    assert srv.patch("/v1/models/" + env["models"][0], {"price_in_per_mtok": 0, "price_out_per_mtok": 0},
                     key=k["client"]).status_code == 403
    assert srv.put("/v1/policy", {"cost_weight": 1}, key=k["client"]).status_code == 403
    assert srv.get("/v1/policy", key=k["feedback"]).status_code == 403
    assert srv.get("/metrics", key=k["client"]).status_code == 403
    assert srv.get("/metrics").status_code == 200
    assert snapshot(srv) == before
    # the right roles work
    assert srv.post("/v1/route", {"prompt": PROMPT}, key=k["route"]).status_code == 200
    assert srv.get("/v1/models", key=k["route"]).status_code == 200
    rid = srv.post("/v1/route", {"prompt": PROMPT}, key=k["client"]).json()["request_id"]
    assert srv.post("/v1/feedback", {"request_id": rid, "thumbs": "up"}, key=k["feedback"]).status_code == 200
    # /healthz: liveness for anyone, details for keys
    assert srv.get("/healthz", key="").json() == {"status": "ok"}
    assert "models" in srv.get("/healthz", key=k["route"]).json()
    assert srv.get("/healthz?digest=1", key=k["route"]).status_code == 403
    assert srv.get("/healthz", key="wrong").json() == {"status": "ok"}  # liveness: an invalid key is no key


def test_json_endpoints_need_application_json(env, srv):
    """Issue 12 #1: a web page could POST text/plain (no CORS preflight) to add a model."""
    before = snapshot(srv)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        for path, body in (("/v1/models", NEW), ("/v1/route", {"prompt": PROMPT}),
                           ("/v1/feedback", {"request_id": "r", "quality": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            headers = {} if ctype is None else {"content-type": ctype}
            r = httpx.post(srv.url + path, content=json.dumps(body), timeout=30,
                           headers={**headers, **srv.headers()})
            assert_rejected(srv, r, 415, "Content-Type must be application/json")
    assert snapshot(srv) == before
    assert srv.post("/v1/route", content=json.dumps({"prompt": PROMPT}),
                    headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_non_loopback_bind_without_keys_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mixllm_jax.cli", "serve", "--checkpoint", str(tmp_path),
                        "--host", "0.0.0.0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to serve on 0.0.0.0 without API keys" in lines[0], r.stderr


# ---- 1. SSRF and secrets ---------------------------------------------------------------------


@pytest.mark.parametrize("backend, status, needle", [
    ({"base_url": "http://169.254.169.254/latest/meta-data"}, 403, "allow-list"),
    ({"base_url": "http://127.0.0.1:1/v1"}, 403, "allow-list"),
    ({"base_url": "http://localhost/v1"}, 403, "allow-list"),
    ({"base_url": "http://user:pw@{stub_host}/ok/v1"}, 422, "user name or password"),
    ({"base_url": "http://{stub_host}/ok/v1?x=1"}, 422, "query"),
    ({"base_url": "file:///etc/passwd"}, 422, "http(s) URL"),
    ({"base_url": "http://{stub_host}/ok/v1", "api_key_env": "MIXLLM_TEST_SERVER_SECRET"}, 403, "api_key_env"),
    ({"base_url": "http://{stub_host}/ok/v1", "api_key_env": "HOME"}, 403, "api_key_env"),
    ({"base_url": "http://{stub_host}/ok/v1", "timeout_s": 1e300}, 422, "timeout_s"),
])
def test_backend_from_a_request_must_be_on_the_allow_list(env, srv, backend, status, needle):
    """Issue 12 #1: any base_url (cloud metadata too) and api_key_env naming any variable of the
    server's environment were accepted, and traffic then went there with that secret."""
    stub_host = env["stub"].split("//", 1)[1]
    backend = {k: v.replace("{stub_host}", stub_host) if isinstance(v, str) else v for k, v in backend.items()}
    before = snapshot(srv)
    r = srv.post("/v1/models", {**NEW, "prior": 50.0, "backend": backend})
    assert_rejected(srv, r, status, needle)
    assert snapshot(srv) == before
    assert "extra-llm" not in [m["id"] for m in srv.get("/v1/models").json()["data"]]


def test_allowed_backend_gets_the_operators_key_never_a_requested_one(env, srv):
    stub_host = env["stub"].split("//", 1)[1]
    r = srv.post("/v1/models", {**NEW, "prior": 50.0, "backend": {"base_url": f"http://{stub_host}/ok/v1",
                                                                   "model": "at-stub"}})
    assert r.status_code == 201, r.text
    assert r.json()["backend"] == {"model": "at-stub", "timeout_s": 60.0}
    try:
        chat = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]},
                        key=env["keys"]["route"])
        assert chat.status_code == 200 and chat.headers["x-mixllm-model"] == "extra-llm", chat.text
        seen = stub_requests(env)[-1]
        assert seen["body"]["model"] == "at-stub"
        assert seen["headers"].get("authorization") == f"Bearer {BACKEND_KEY}"  # the allow-list entry's key
        assert SERVER_SECRET not in json.dumps(stub_requests(env))
    finally:
        assert srv.delete("/v1/models/extra-llm").status_code == 200


def test_clients_never_see_backend_urls_or_internals(env, srv):
    text = srv.get("/v1/models", key=env["keys"]["route"]).text
    assert "http" not in text and "base_url" not in text and "api_key_env" not in text
    assert "127.0.0.1" not in srv.get("/healthz").text
    r = srv.post("/v1/models", {**NEW, "name": "unreachable-llm", "prior": 50.0,
                                "backend": {"base_url": f"http://{env['closed']}/v1", "timeout_s": 2}})
    assert r.status_code == 201, r.text
    try:
        chat = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})
        assert chat.status_code == 200, chat.text  # answered by the next-best LLM
        [fb] = chat.json()["mixllm"]["fallbacks"]
        msg = fb["error"]
        assert fb["model"] == "unreachable-llm" and "could not be reached" in msg, msg
        assert "127.0.0.1" not in msg and "Error" not in msg, msg
        pinned = srv.post("/v1/chat/completions", {"model": "unreachable-llm",
                                                   "messages": [{"role": "user", "content": PROMPT}]})
        assert pinned.status_code == 503 and "127.0.0.1" not in pinned.text  # cooling down
    finally:
        assert srv.delete("/v1/models/unreachable-llm").status_code == 200


# ---- 2. poison requests: validate, then commit ------------------------------------------------


@pytest.mark.parametrize("body, status, needle", [
    (b'{"name": "\\ud800", "price_in_per_mtok": 1, "price_out_per_mtok": 1}', 400, "surrogate"),
    (b'{"name": "ok-name", "price_in_per_mtok": 1e300, "price_out_per_mtok": 1}', 422, "price_in_per_mtok"),
    (b'{"name": "ok-name", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "ttft_s": 1e300}', 422, "ttft_s"),
    (b'{"name": "ok-name", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "tokens_per_s": 1e-300}', 422,
     "tokens_per_s"),
    (b'{"name": "ok-name", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "prior": 1e300}', 422, "prior"),
    (b'{"name": "ok-name", "price_in_per_mtok": 1, "price_out_per_mtok": 3.5e38}', 422, "price_out_per_mtok"),
    (b'{"name": "ok-name", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "max_concurrency": 1000000}', 422,
     "max_concurrency"),
    (b'{"name": "a b", "price_in_per_mtok": 1, "price_out_per_mtok": 1}', 422, "model name"),
    (b'{"name": "x\\u0000y", "price_in_per_mtok": 1, "price_out_per_mtok": 1}', 422, "model name"),
    (b'{"name": "\\u00e9t\\u00e9", "price_in_per_mtok": 1, "price_out_per_mtok": 1}', 422, "model name"),
    (b'{"name": "../../etc", "price_in_per_mtok": 1, "price_out_per_mtok": 1}', 422, "model name"),
    (('{"name": "%s", "price_in_per_mtok": 1, "price_out_per_mtok": 1}' % ("m" * 129)).encode(), 422, "name"),
])
def test_poison_models_leave_no_trace(env, srv, body, status, needle):
    """Issue 12 #2: such a request answered 500 but registered the model, and from then on
    /healthz, /v1/models and /v1/route answered 500, also after a restart."""
    before = snapshot(srv)
    r = srv.post("/v1/models", content=body)
    assert_rejected(srv, r, status, needle)
    assert snapshot(srv) == before
    assert srv.get("/healthz").status_code == 200 and srv.get("/v1/models").status_code == 200
    assert srv.post("/v1/route", {"prompt": PROMPT}).status_code == 200


def test_capacity_is_bounded_by_max_llms(env, srv):
    """Issue 12 #4: 120 add/delete pairs grew the capacity 16 -> 256 arms for good."""
    h = srv.get("/healthz").json()
    cap, n = h["capacity"], len(h["models"])
    compiled = h["compiled_route_shapes"]
    added = []
    try:
        for i in range(14 - n):
            r = srv.post("/v1/models", {**NEW, "name": f"cap-{i}"})
            assert r.status_code == 201, r.text
            added.append(f"cap-{i}")
        before = snapshot(srv)
        r = srv.post("/v1/models", {**NEW, "name": "one-too-many"})
        assert_rejected(srv, r, 409, "--max-llms")
        assert r.json()["error"]["type"] == "limit_reached"
        assert snapshot(srv) == before
        for i in range(30):  # add/delete pairs reuse the free slot
            assert srv.delete(f"/v1/models/{added[-1]}").status_code == 200
            assert srv.post("/v1/models", {**NEW, "name": f"cycle-{i}"}).status_code == 201
            added[-1] = f"cycle-{i}"
        srv.route(book_load=False)
        h = srv.get("/healthz").json()
        assert h["capacity"] == cap and cap <= 2 * 14
        assert h["compiled_route_shapes"] == compiled or compiled is None
    finally:
        for name in added:
            assert srv.delete(f"/v1/models/{name}").status_code == 200


# ---- 5. malformed requests: 4xx, never 500 ----------------------------------------------------

DEEP = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HUGE = "1" * 401


@pytest.mark.parametrize("path", ["/v1/route", "/v1/feedback", "/v1/models", "/v1/chat/completions"])
def test_deep_json_is_a_400(env, srv, path):
    before = snapshot(srv)
    for body in (DEEP, b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                 b"[" * 65 + b"]" * 65):
        r = srv.post(path, content=body)
        assert_rejected(srv, r, 400, "nested deeper than 64")
    assert snapshot(srv) == before


@pytest.mark.parametrize("path, body", [
    ("/v1/route", '{"prompt": "x", "cost_weight": %s}'),
    ("/v1/route", '{"prompt": "x", "max_cost_usd": %s}'),
    ("/v1/route", '{"prompt": "x", "max_cost_usd": -%s}'),
    ("/v1/feedback", '{"request_id": "r", "quality": %s}'),
    ("/v1/feedback", '{"request_id": "r", "quality": 1, "completion_tokens": %s}'),
    ("/v1/models", '{"name": "n", "price_in_per_mtok": %s, "price_out_per_mtok": 1}'),
    ("/v1/models", '{"name": "n", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "max_concurrency": %s}'),
    ("/v1/models", '{"name": "n", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "prior": %s}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "cost_weight": %s}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}'),
])
def test_huge_integers_are_a_400(env, srv, path, body):
    before = snapshot(srv)
    r = srv.post(path, content=(body % HUGE).encode())
    assert_rejected(srv, r, 400, "401 digits")
    assert snapshot(srv) == before


@pytest.mark.parametrize("path, body", [
    ("/v1/route", b'{"prompt": "\\ud800"}'),
    ("/v1/route", b'{"prompt": ["fine", "a\\udfffb"]}'),
    ("/v1/route", b'{"prompt": "x\\ud83d"}'),
    ("/v1/feedback", b'{"request_id": "\\ud800", "quality": 1}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}'),
])
def test_lone_surrogates_are_a_400(env, srv, path, body):
    before = snapshot(srv)
    r = srv.post(path, content=body)
    assert_rejected(srv, r, 400, "surrogate")
    assert snapshot(srv) == before
    ok = srv.post("/v1/route", content=b'{"prompt": "a pair is fine: \\ud83d\\ude00"}')
    assert ok.status_code == 200, ok.text


# ---- 7. slow clients --------------------------------------------------------------------------


def _raw(port: int, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `data`, then read until the server closes (at most wait_s): (bytes read, seconds)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=wait_s)
    t = time.monotonic()
    s.sendall(data)
    got = b""
    try:
        while time.monotonic() - t < wait_s:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    finally:
        s.close()
    return got, time.monotonic() - t


def test_slow_body_is_timed_out(env, srv):
    """Issue 12 #7: 100 slow connections were held 40 s; now a body not there within
    --body-timeout-s (2 s here) is answered 408 and its connection closed."""
    from conftest import TEST_KEYS

    head = (f"POST /v1/route HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEYS['admin']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    got, took = _raw(srv.port, head + b'{"prompt": "', 15)
    assert got.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in got, got[:300]
    assert took < 8


def test_slow_headers_are_timed_out(env, srv):
    got, took = _raw(srv.port, b"POST /v1/route HTTP/1.1\r\nHost: x\r\n", 15)
    assert got == b"" and took < 8  # closed without an answer
    got, took = _raw(srv.port, b"", 15)  # connected, sent nothing
    assert got == b"" and took < 8


def test_oversized_request_heads_are_refused(env, srv):
    """A request line plus headers over 64 KiB is answered 400 and its connection closed; 16 KiB is fine."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    got, took = _raw(srv.port, head + b"X-Pad: " + b"a" * (70 * 1024) + b"\r\n\r\n", 15)
    assert got.startswith(b"HTTP/1.1 400") and took < 8, got[:200]
    got, _ = _raw(srv.port, head + b"X-Pad: " + b"a" * (16 * 1024) + b"\r\nConnection: close\r\n\r\n", 15)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]


def test_many_slow_connections_are_all_released(env, srv):
    socks = []
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        s.sendall(b"POST /v1/route HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n" if i % 2 else b"GE")
        socks.append(s)
    t = time.monotonic()
    for s in socks:
        try:
            while s.recv(65536):
                pass
        except (socket.timeout, ConnectionResetError):
            pytest.fail("a slow connection was still open after 20 s")
        finally:
            s.close()
    assert time.monotonic() - t < 10
    assert srv.post("/v1/route", {"prompt": PROMPT}).status_code == 200


# ---- 6. checkpoint metadata (the unit tests are in test_checkpoint.py) -------------------------


def test_serve_refuses_an_edited_checkpoint_in_one_line(env, tmp_path):
    import shutil

    from mixllm_jax.store import checkpoint

    ck = tmp_path / "ck"
    src = env["server"].checkpoint
    shutil.copytree(src, ck, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    step = checkpoint.list_steps(ck)[-1]
    meta_file = ck / str(step) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["policy"]["cost_weight"] = 1e6
    meta_file.write_text(json.dumps(meta))
    from serve_helpers import free_port

    r = subprocess.run([sys.executable, "-m", "mixllm_jax.cli", "serve", "--checkpoint", str(ck),
                        "--port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mixllm-jax: error: the router could not start:") and "fails its checksum" in last
    assert "Traceback" not in r.stderr


# ---- 3. exactly-once feedback across journal pruning and restarts (restarts the server) ---------


def test_duplicate_feedback_after_pruning_and_restart_is_refused(env, srv):
    """Issue 12 #3: feedback was counted twice once the journal segment holding the first one was
    pruned and the server restarted."""
    first = srv.route(book_load=False)
    rid = first["request_id"]
    fb = srv.post("/v1/feedback", {"request_id": rid, "quality": 1.0})
    assert fb.status_code == 200, fb.text
    seq = fb.json()["recorded"][0]["seq"]
    assert srv.stop(signal.SIGTERM) == 0  # checkpoint A (holds seq)
    srv.start()
    other = srv.route(["another question"], book_load=False)["routes"][0]
    assert srv.post("/v1/feedback", {"request_id": other["request_id"], "quality": 0.5}).status_code == 200
    assert srv.stop(signal.SIGTERM) == 0  # checkpoint B: prunes segments up to checkpoint A
    journal = env["tmp"] / "serve" / "journal"
    firsts = [int(p.stem.split("-")[1]) for p in journal.glob("journal-*.jsonl")]
    assert firsts and min(firsts) > seq, f"the segment holding seq {seq} was not pruned: {sorted(firsts)}"
    # a record journaled by an older version (a poison model) must not keep the server from starting
    last = max(journal.glob("journal-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    top = max(json.loads(line)["seq"] for p in journal.glob("journal-*.jsonl") for line in p.read_text().splitlines())
    with open(last, "a") as f:
        f.write(json.dumps({"type": "add_model", "name": "\ud800", "price_in": 1e294, "price_out": 0,
                            "ttft_s": 1e300, "tokens_per_s": 50, "max_concurrency": 4, "prior": "uninformative",
                            "backend": {"base_url": "http://169.254.169.254/v1", "api_key_env": "HOME"},
                            "seq": top + 1}) + "\n")
    srv.start()
    h = srv.get("/healthz").json()
    assert h["skipped_records"] >= 1 and "\ud800" not in h["models"]
    obs = srv.observations()
    dup = srv.post("/v1/feedback", {"request_id": rid, "quality": 0.0})
    assert_rejected(srv, dup, 409, "already has a quality observation")
    assert srv.observations() == obs
    assert srv.post("/v1/feedback", {"request_id": rid, "thumbs": "up"}).status_code == 200  # the other kind, once
    assert srv.post("/v1/feedback", {"request_id": rid, "thumbs": "up"}).status_code == 409
    assert srv.post("/v1/route", {"prompt": PROMPT}).status_code == 200 and srv.get("/v1/models").status_code == 200

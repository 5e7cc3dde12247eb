"""End-to-end tests of the HTTP router service: the real server and stub backends as processes.

One small router (100 RouterBench queries, a tiny head, max_length 64) is trained and saved with
Orbax once per session (conftest.py, serve_helpers.py); the server restores it with the real
MiniLM encoder. Everything runs on 127.0.0.1, without API keys (loopback). The tests share one
server and run in file order; the last ones kill and restart it. The security findings of issue
12 have their regression tests in test_security.py, the fuzz suite in test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import signal

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_helpers import PROMPT, ServerProc, write_backends  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, served_router, stub_backend):
    ck, models = served_router
    tmp = tmp_path_factory.mktemp("serve")
    server = ServerProc.from_router(tmp, ck, write_backends(tmp / "backends.yaml", stub_backend, models))
    try:
        server.start()
        yield {"server": server, "stub": stub_backend, "models": models, "ck": server.checkpoint, "tmp": tmp}
    finally:
        server.kill()


@pytest.fixture
def srv(env) -> ServerProc:
    return env["server"]


def stub_requests(env) -> list:
    return httpx.get(env["stub"] + "/_requests", timeout=10).json()


# ---------------------------------------------------------------------------------------------
# The pieces, without a server


def test_journal_group_commit_replay_and_torn_tail(tmp_path):
    from mixllm_jax.store.journal import Journal, LogError

    seen = []
    j = Journal(tmp_path, on_durable=seen.extend)
    j.start()
    futs = [j.append({"type": "quality", "i": i}) for i in range(20)]
    assert [f.result(30) for f in futs] == list(range(1, 21))
    j.rotate()
    assert j.append({"type": "usage"}).result(30) == 21
    j.close()
    assert [r["seq"] for r in seen] == list(range(1, 22)) and j.fsyncs <= 21
    assert len(j.segments()) == 2
    last = j.segments()[-1]
    with open(last, "ab") as f:
        f.write(b'{"seq": 22, "type": "qual')  # a crash mid-write: never acknowledged
    j2 = Journal(tmp_path)
    recs = j2.read()
    assert [r["seq"] for r in recs] == list(range(1, 22)) and j2.seq == 21
    assert last.read_bytes().endswith(b"\n")  # the torn tail was cut off
    j2.start()
    assert j2.append({"type": "usage"}).result(30) == 22
    j2.close()
    assert len(j2.prune(21)) == 2 and [r["seq"] for r in Journal(tmp_path).read()] == [22]
    first = Journal(tmp_path).segments()[0]
    first.write_bytes(b'{"seq": 22}\nnot json\n{"seq": 23}\n')
    with pytest.raises(LogError, match="damaged log line"):
        Journal(tmp_path).read()


def test_feature_store_is_bounded_and_reloads(tmp_path):
    from mixllm_jax.store.journal import Entry, FeatureStore

    fs = FeatureStore(tmp_path, capacity=10)
    x = np.arange(5, dtype=np.float32)
    for i in range(25):
        fs.put_many([(f"r{i}", Entry(x + i, slot=i % 3, generation=0, model="m", prompt_tokens=3, log_tokens=1.0))])
    assert len(fs) == 10 and fs.get("r14") is None and fs.get("r15") is not None
    fs.close()
    assert len(list(tmp_path.glob("requests-*.jsonl"))) <= 3
    again = FeatureStore(tmp_path, capacity=10)
    assert again.load() >= 10 and len(again) == 10
    e = again.get("r24")
    np.testing.assert_array_equal(e.x, x + 24)
    assert (e.slot, e.model) == (0, "m") and again.get("r14") is None
    assert e.propensity == 1.0  # the default
    fs2 = FeatureStore(tmp_path / "p", capacity=10)
    fs2.put_many([("q", Entry(x, slot=1, generation=0, model="m", prompt_tokens=3, log_tokens=1.0, propensity=0.125))])
    fs2.close()
    back = FeatureStore(tmp_path / "p", capacity=10)
    back.load()
    assert back.get("q").propensity == 0.125  # logged and reloaded


def test_micro_batcher_batches_and_bounds_its_queue():
    import concurrent.futures
    import threading

    from mixllm_jax.serve.batcher import MicroBatcher, Overloaded

    gate = threading.Event()
    sizes = []

    def run(payloads):
        gate.wait(30)
        sizes.append(len(payloads))
        return [p * 2 for p in payloads]

    async def main():
        ex = concurrent.futures.ThreadPoolExecutor(1)
        b = MicroBatcher(run, ex, window_s=0.001, max_batch=4, queue_limit=8)
        b.start()
        first = asyncio.ensure_future(b.submit([1, 2, 3, 4, 5, 6]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="queue is full"):
            await b.submit([7, 8, 9])
        rest = asyncio.ensure_future(b.submit([7, 8]))
        await asyncio.sleep(0.01)
        gate.set()
        assert await first == [2, 4, 6, 8, 10, 12] and await rest == [14, 16]
        await b.stop()
        ex.shutdown()
        return b

    b = asyncio.run(main())
    assert sum(sizes) == 8 and max(sizes) <= 4 and b.pending == 0


def test_micro_batcher_waits_only_for_announced_items():
    """A lone item is not held for the window; an item announced with `expect` is waited for."""
    import concurrent.futures

    from mixllm_jax.serve.batcher import MicroBatcher

    sizes = []

    async def main():
        ex = concurrent.futures.ThreadPoolExecutor(1)
        b = MicroBatcher(lambda p: (sizes.append(len(p)), p)[1], ex, window_s=60.0, max_batch=8, queue_limit=8)
        b.start()
        assert await asyncio.wait_for(b.submit([1]), 20) == [1]  # nothing on its way: not held 60 s
        with b.expect(1):
            first = asyncio.ensure_future(b.submit([2]))
            await asyncio.sleep(0.1)
            assert not first.done() and b.expected == 1  # held for the announced item
        second = await asyncio.wait_for(b.submit([3]), 20)
        assert await first == [2] and second == [3] and b.expected == 0
        await b.stop()
        ex.shutdown()

    asyncio.run(main())
    assert sizes == [1, 2]


# ---------------------------------------------------------------------------------------------


def test_healthz_and_models(env, srv):
    h = srv.get("/healthz").json()
    assert h["status"] == "ok" and h["models"] == env["models"] and h["checkpoint_step"] == 1
    data = srv.get("/v1/models").json()["data"]
    assert [m["id"] for m in data if m["kind"] == "router"] == ["mixllm"]
    data = [m for m in data if m["kind"] == "llm"]
    assert [m["id"] for m in data] == env["models"]
    gpt4 = data[0]
    assert gpt4["price_in_per_mtok"] == 10.0 and gpt4["price_out_per_mtok"] == 30.0
    assert gpt4["backend"] == {"model": "renamed-at-backend", "timeout_s": 60.0}  # no URL, no key variable


def test_route_one_and_many(env, srv):
    r = srv.route()
    assert set(r) == {"request_id", "model", "domain", "explanation"}
    assert set(r["explanation"]) == set(env["models"]) and r["model"] in env["models"]
    scores = {m: v["score"] for m, v in r["explanation"].items()}
    assert r["model"] == max(scores, key=scores.get)
    for v in r["explanation"].values():
        assert {"quality", "tokens", "cost", "uncertainty", "wait", "penalty", "feedback", "score",
                "eligible"} <= set(v)
    many = srv.route(["def add(a, b):", PROMPT, "Translate 'chat' into English."])["routes"]
    assert len(many) == 3 and len({x["request_id"] for x in many} | {r["request_id"]}) == 4


def test_cost_weight_and_max_cost_usd(env, srv):
    cheap = srv.route(cost_weight=1e9, book_load=False)
    costs = {m: v["cost"] for m, v in cheap["explanation"].items()}
    assert cheap["model"] == min(costs, key=costs.get)
    tiny = srv.route(max_cost_usd=1e-12, book_load=False)  # nothing fits: the cheapest LLM
    assert tiny["model"] == min(costs, key=costs.get)
    assert [m for m, v in tiny["explanation"].items() if v["eligible"]] == [tiny["model"]]
    roomy = srv.route(max_cost_usd=1e3, book_load=False)
    assert all(v["eligible"] for v in roomy["explanation"].values())


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/route", b"{not json", 400, "malformed JSON"),
    ("/v1/route", b"[1, 2]", 400, "JSON object"),
    ("/v1/route", b"", 400, "empty request body"),
    ("/v1/route", b'{"prompt": "x", "cost_weight": NaN}', 400, "NaN"),
    ("/v1/route", {"promt": "x"}, 422, "promt"),
    ("/v1/route", {"cost_weight": 1}, 422, "'prompt' is required"),
    ("/v1/route", {"prompt": 5}, 422, "string or a list"),
    ("/v1/route", {"prompt": ["ok", 3]}, 422, "prompt[1]"),
    ("/v1/route", {"prompt": "x" * 4001}, 413, "4001 characters"),
    ("/v1/route", {"prompt": ["a"] * 9}, 413, "9 prompts"),
    ("/v1/route", {"prompt": "x", "cost_weight": -1}, 422, "'cost_weight' must be in [0, 1e+12]"),
    ("/v1/route", {"prompt": "x", "cost_weight": "high"}, 422, "'cost_weight' must be a number"),
    ("/v1/route", {"prompt": "x", "max_cost_usd": 0}, 422, "'max_cost_usd' must be in (0, 1e+06]"),
    ("/v1/route", {"prompt": "x", "budget": 0.1}, 422, "unknown field(s) ['budget']"),
    ("/v1/feedback", {"request_id": "req-nope", "quality": 0.5}, 404, "unknown request id 'req-nope'"),
    ("/v1/feedback", {"quality": 0.5}, 422, "'request_id' is required"),
    ("/v1/feedback", {"request_id": "req-nope", "quality": 1.5}, 422, "'quality' must be in [0, 1]"),
    ("/v1/feedback", {"request_id": "req-nope", "thumbs": "sideways"}, 422, "'thumbs'"),
    ("/v1/feedback", {"request_id": "req-nope"}, 422, "give 'quality'"),
    ("/v1/models", {"name": "m", "price_in_per_mtok": 1}, 422, "'price_out_per_mtok' is required"),
    ("/v1/models", {"name": "m", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "max_concurrency": 2.5},
     422, "must be an integer"),
    ("/v1/models", {"name": "gpt-4-1106-preview", "price_in_per_mtok": 1, "price_out_per_mtok": 1}, 409,
     "already registered"),
    ("/v1/models", {"name": "m", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "backend": {"url": "x"}}, 422,
     "unknown key"),
    ("/v1/chat/completions", {"model": "auto"}, 422, "'messages' is required"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 422, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, 422, "non-empty list"),
])
def test_bad_input_gets_4xx_naming_the_problem(srv, path, body, status, needle):
    r = srv.post(path, content=body) if isinstance(body, bytes) else srv.post(path, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_unknown_paths_and_models(srv):
    r = srv.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = srv.delete("/v1/models/no-such-llm")
    assert r.status_code == 404 and "no-such-llm" in r.json()["error"]["message"]
    assert srv.get("/v1/route").status_code == 405


def test_chat_proxy_forwards_and_records_usage(env, srv):
    before = srv.metric("mixllm_feedback_total", kind="usage")
    r = srv.post("/v1/chat/completions", {"model": "auto", "temperature": 0.1, "cost_weight": 0.0,
                                          "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": PROMPT}]})
    assert r.status_code == 200, r.text
    body = r.json()
    model = r.headers["x-mixllm-model"]
    assert body["choices"][0]["message"]["content"].startswith("This is the stub")
    assert body["mixllm"] == {"request_id": r.headers["x-mixllm-request-id"], "model": model, "fallbacks": []}
    seen = stub_requests(env)[-1]["body"]
    assert seen["temperature"] == 0.1 and "cost_weight" not in seen
    assert seen["model"] == ("renamed-at-backend" if model == env["models"][0] else model)
    assert srv.metric("mixllm_feedback_total", kind="usage") == before + 1
    # the observed usage is kept for this request: quality feedback on it is accepted
    fb = srv.post("/v1/feedback", {"request_id": body["mixllm"]["request_id"], "quality": 0.9})
    assert fb.status_code == 200 and fb.json()["model"] == model


def test_chat_proxy_streams(env, srv):
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                      json={"stream": True, "messages": [{"role": "user", "content": PROMPT}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-mixllm-model"] in env["models"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text == "This is the stub backend's answer to your question."


def test_served_decisions_journal_their_propensity(env, srv):
    """Every routed decision's propensity is in the request log and in the feedback journal record,
    so the server's logs can be evaluated off-policy (ope.read_log on the log folder)."""
    from mixllm_jax.offline import ope

    r = srv.route(book_load=False)
    fb = srv.post("/v1/feedback", {"request_id": r["request_id"], "quality": 0.25})
    assert fb.status_code == 200, fb.text
    recs = [json.loads(line) for p in sorted((env["tmp"] / "serve" / "journal").glob("journal-*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]
    mine = [x for x in recs if x.get("rid") == r["request_id"]]
    assert mine and mine[-1]["propensity"] == 1.0  # the server routes deterministically (UCB)
    log = ope.read_log(env["tmp"] / "serve")
    assert r["model"] in log.model and np.all(log.propensity == 1.0) and 0.25 in log.reward


def test_quality_feedback_changes_later_decisions(srv):
    first = srv.route(book_load=False)["model"]
    obs0 = srv.observations()[first]
    changed, sent = None, 0
    for _ in range(40):
        r = srv.route(book_load=False)
        if r["model"] != first:
            changed = r["model"]
            break
        fb = srv.post("/v1/feedback", {"request_id": r["request_id"], "quality": 0.0})
        assert fb.status_code == 200, fb.text
        sent += 1
    assert changed is not None, f"40 quality-0 observations did not move the decision away from {first}"
    assert sent >= 1 and srv.observations()[first] == obs0 + sent


def test_thumbs_feedback_moves_the_feedback_term(srv):
    r = srv.route(book_load=False)
    before = r["explanation"][r["model"]]["feedback"]
    fb = srv.post("/v1/feedback", {"request_id": r["request_id"], "thumbs": "down"})
    assert fb.status_code == 200 and fb.json()["recorded"][0]["kind"] == "thumbs"
    again = srv.post("/v1/feedback", {"request_id": r["request_id"], "thumbs": "up"})
    assert again.status_code == 409 and "already has a thumbs" in again.json()["error"]["message"]
    after = srv.route(book_load=False)["explanation"][r["model"]]["feedback"]
    assert after < before


def test_live_add_and_remove_without_recompiling(env, srv):
    srv.route(book_load=False)  # this shape is compiled
    compiled = srv.get("/healthz").json()["compiled_route_shapes"]
    r = srv.post("/v1/models", {"name": "fresh-llm", "price_in_per_mtok": 0.01, "price_out_per_mtok": 0.01,
                                "ttft_s": 0.2, "tokens_per_s": 100, "max_concurrency": 4, "prior": 2.0,
                                "backend": {"base_url": env["stub"] + "/ok/v1", "model": "fresh-at-backend"}})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "fresh-llm" and r.json()["max_concurrency"] == 4
    assert "fresh-llm" in [m["id"] for m in srv.get("/v1/models").json()["data"]]
    routed = srv.route(book_load=False)
    assert routed["model"] == "fresh-llm"
    assert srv.get("/healthz").json()["compiled_route_shapes"] == compiled  # no recompilation
    cost = routed["explanation"]["fresh-llm"]["cost"]
    p = srv.patch("/v1/models/fresh-llm", {"price_in_per_mtok": 5, "price_out_per_mtok": 7})  # reprice
    assert p.status_code == 200, p.text
    assert (p.json()["price_in_per_mtok"], p.json()["price_out_per_mtok"]) == (5, 7)
    assert srv.route(book_load=False)["explanation"]["fresh-llm"]["cost"] > 100 * cost
    assert srv.patch("/v1/models/fresh-llm", {"price_in_per_mtok": -1, "price_out_per_mtok": 1}).status_code == 422
    assert srv.patch("/v1/models/fresh-llm", {"price_in_per_mtok": 1}).status_code == 422
    assert srv.patch("/v1/models/no-such-llm", {"price_in_per_mtok": 1, "price_out_per_mtok": 1}).status_code == 404
    assert srv.get("/healthz").json()["compiled_route_shapes"] == compiled
    chat = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})
    assert chat.status_code == 200 and chat.headers["x-mixllm-model"] == "fresh-llm"
    assert stub_requests(env)[-1]["body"]["model"] == "fresh-at-backend"

    assert srv.delete("/v1/models/fresh-llm").json() == {"removed": "fresh-llm"}
    assert "fresh-llm" not in [m["id"] for m in srv.get("/v1/models").json()["data"]]
    for _ in range(5):
        r = srv.route(book_load=False)
        assert r["model"] != "fresh-llm" and "fresh-llm" not in r["explanation"]
    late = srv.post("/v1/feedback", {"request_id": routed["request_id"], "quality": 1.0})
    assert late.status_code == 409 and "removed" in late.json()["error"]["message"]
    assert srv.get("/healthz").json()["compiled_route_shapes"] == compiled


@pytest.mark.parametrize("behaviour,needle,stream", [
    ("fail", "answered HTTP 500", False),
    ("bad", "invalid JSON", False),
    ("hang", "timed out", False),
    ("fail", None, True),
])
def test_backend_failures_fall_back_and_cool_down(env, srv, behaviour, needle, stream):
    """A failing backend (before the answer starts, streaming or not) counts in its LLM's failure rate
    (never as a quality observation: issue 24), puts it on a cooldown, and the request is answered by
    the next-best LLM of the same decision."""
    name = f"{behaviour}-llm"
    r = srv.post("/v1/models", {"name": name, "price_in_per_mtok": 0, "price_out_per_mtok": 0, "prior": 3.0,
                                "backend": {"base_url": f"{env['stub']}/{behaviour}/v1", "timeout_s": 0.5}})
    assert r.status_code == 201, r.text
    try:
        fails = srv.metric("mixllm_backend_failures_total", model=name)
        body = {"cost_weight": 1e9, "messages": [{"role": "user", "content": PROMPT}]}  # the free LLM wins
        assert srv.route(cost_weight=1e9, book_load=False)["model"] == name
        if stream:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60, json={**body, "stream": True}) as s:
                assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
                assert s.headers["x-mixllm-model"] != name and s.headers["x-mixllm-attempts"] == "2"
                events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
            assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]).startswith("This is")
        else:
            resp = srv.post("/v1/chat/completions", body)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-mixllm-model"] != name and resp.headers["x-mixllm-attempts"] == "2"
            [fb] = resp.json()["mixllm"]["fallbacks"]
            assert fb["model"] == name and needle in fb["error"] and "quality" not in fb["error"]
        assert srv.metric("mixllm_backend_failures_total", model=name) == fails + 1
        assert srv.metric("mixllm_fallbacks_total", model=name) >= 1
        assert srv.observations()[name] == 0.0  # an availability signal, not a quality observation
        rate = {m["id"]: m.get("failure_rate") for m in srv.get("/v1/models").json()["data"]}[name]
        assert rate == 1.0 and srv.metric("mixllm_backend_failure_rate", model=name) == 1.0
        # cooling down: the next chat request (streaming too) does not try it
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60, json={**body, "stream": True}) as s:
            assert s.status_code == 200 and s.headers["x-mixllm-model"] != name
            assert s.headers["x-mixllm-attempts"] == "1"
            s.read()
        pinned = srv.post("/v1/chat/completions", {**body, "model": name})  # pinned: no fallback
        assert pinned.status_code == 503 and "cooling down" in pinned.json()["error"]["message"]
    finally:
        assert srv.delete(f"/v1/models/{name}").status_code == 200


def test_backend_client_errors_pass_through(env, srv):
    name = "reject-llm"
    r = srv.post("/v1/models", {"name": name, "price_in_per_mtok": 0, "price_out_per_mtok": 0, "prior": 3.0,
                                "backend": {"base_url": f"{env['stub']}/reject/v1", "timeout_s": 0.5}})
    assert r.status_code == 201, r.text
    try:
        for stream in (False, True):
            resp = srv.post("/v1/chat/completions", {"stream": stream, "cost_weight": 1e9,
                                                     "messages": [{"role": "user", "content": PROMPT}]})
            assert resp.status_code == 400 and "stub rejects" in resp.text, resp.text
            assert resp.headers["x-mixllm-model"] == name
        assert srv.observations()[name] == 0.0  # the request's fault, not the LLM's: no feedback, no cooldown
    finally:
        assert srv.delete(f"/v1/models/{name}").status_code == 200


def test_overload_answers_429_with_retry_after(srv):
    async def burst(n):
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(c.post(srv.url + "/v1/route", json={"prompt": f"{PROMPT} #{i}"})
                                          for i in range(n)))

    statuses = []
    for _ in range(3):  # bounded: a burst of 48 against a queue of 8 overflows it
        rs = asyncio.run(burst(48))
        statuses += [r.status_code for r in rs]
        assert {r.status_code for r in rs} <= {200, 429}
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]["message"]
        if 429 in statuses:
            break
    assert 429 in statuses and 200 in statuses
    assert srv.metric("mixllm_rejected_total", reason="queue_full") >= 1
    h = srv.get("/healthz").json()
    assert h["queue"] == 0 and h["proxy_inflight"] == 0


def test_metrics_text(srv):
    text = srv.get("/metrics").text
    for name in ("mixllm_http_requests_total", "mixllm_route_batch_size_bucket", "mixllm_decisions_total",
                 "mixllm_feedback_total", "mixllm_backend_seconds_bucket", "mixllm_http_request_seconds_bucket",
                 "mixllm_queue_prompts", "mixllm_journal_seq"):
        assert name in text
    assert srv.metric("mixllm_route_batch_size_count") >= 1
    assert srv.metric("mixllm_feedback_total", kind="quality") >= 1
    assert srv.metric("mixllm_http_requests_total", endpoint="route", status="422") >= 1


def test_kill9_restart_loses_no_acknowledged_feedback(env, srv):
    r = srv.post("/v1/models", {"name": "durable-llm", "price_in_per_mtok": 1, "price_out_per_mtok": 2,
                                "backend": {"base_url": env["stub"] + "/ok/v1"}})
    assert r.status_code == 201
    assert srv.patch("/v1/models/durable-llm", {"price_in_per_mtok": 3, "price_out_per_mtok": 4}).status_code == 200
    assert srv.get("/v1/policy").json()["cost_weight"] == 0  # the small router's operating point
    for bad in ({"budget": "lots"}, {"budget": "25%", "cost_weight": 1}, {}, {"cost_weight": -1},
                {"budget": "25%", "reference": "no-such-llm"}):
        r = srv.put("/v1/policy", bad)
        assert r.status_code == 422, (bad, r.text)
    no_curve = srv.put("/v1/policy", {"budget": "10%"})  # the small router is trained without cross-fitting
    assert no_curve.status_code == 422 and "no operating curve" in no_curve.json()["error"]["message"]
    assert srv.put("/v1/policy", {"cost_weight": 250.0}).json()["cost_weight"] == 250.0
    obs = srv.observations()
    routes = srv.route(["first question", "second question", PROMPT, "def f(x): return x"])["routes"]
    acked = {}
    for i, rt in enumerate(routes[:3]):
        fb = srv.post("/v1/feedback", {"request_id": rt["request_id"], "quality": 0.25 * i})
        assert fb.status_code == 200, fb.text
        acked[rt["model"]] = acked.get(rt["model"], 0) + 1
    seq = srv.get("/healthz").json()["applied_seq"]
    live = srv.route(book_load=False)["explanation"]
    srv.stop(signal.SIGKILL)
    srv.start()
    h = srv.get("/healthz").json()
    assert h["checkpoint_step"] == 1 and h["replayed"] >= 4 and h["applied_seq"] >= seq
    after = srv.observations()
    assert "durable-llm" in after
    [durable] = [m for m in srv.get("/v1/models").json()["data"] if m["id"] == "durable-llm"]
    assert (durable["price_in_per_mtok"], durable["price_out_per_mtok"]) == (3, 4)  # the reprice was replayed
    assert srv.get("/v1/policy").json()["cost_weight"] == 250.0  # and the policy change
    assert srv.put("/v1/policy", {"cost_weight": 0}).status_code == 200
    for m, n in obs.items():
        assert after[m] == n + acked.get(m, 0), m
    replayed = srv.route(book_load=False)["explanation"]  # the replayed state predicts as the live one did
    for m in live:
        for k in ("quality", "uncertainty", "feedback"):
            assert replayed[m][k] == pytest.approx(live[m][k], rel=1e-3, abs=1e-4), (m, k)
    # a request routed before the crash still takes feedback (its features were logged)
    late = srv.post("/v1/feedback", {"request_id": routes[3]["request_id"], "quality": 1.0})
    assert late.status_code == 200, late.text
    dup = srv.post("/v1/feedback", {"request_id": routes[0]["request_id"], "quality": 1.0})
    assert dup.status_code == 409


def test_sigterm_checkpoints_and_restart_replays_nothing(env, srv):
    from mixllm_jax.store import checkpoint

    obs = srv.observations()
    seq = srv.get("/healthz").json()["applied_seq"]
    assert srv.stop(signal.SIGTERM) == 0
    steps = checkpoint.list_steps(env["ck"])
    assert steps[-1] == 2
    srv.start()
    h = srv.get("/healthz").json()
    assert h["checkpoint_step"] == 2 and h["checkpoint_seq"] == seq and h["replayed"] == 0
    assert srv.observations() == obs
    chat = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})
    assert chat.status_code == 200  # durable-llm's backend came back with it too
    assert srv.stop(signal.SIGTERM) == 0

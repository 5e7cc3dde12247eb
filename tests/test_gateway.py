"""End-to-end tests of the gateway features (issue 17): the OpenAI `model` field and the model list,
per-request candidates, context windows, per-key budgets and spend (surviving restarts), and the
curl examples of docs/gateway.md, run as written.

One server per module: the session's small router re-saved with an operating curve (so
"mixllm:budget=..." works), API keys with budgets, the stub backend for every LLM and a tiny
context window for one of them. The tests run in file order; the last ones restart the server.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import signal
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_helpers import PROMPT, REPO, ServerProc, write_backends, write_keys  # noqa: E402

pytestmark = pytest.mark.slow

KEYS = {"admin": ("mxk_gw-admin", ["admin"], None),
        "team": ("mxk_gw-team", ["route", "feedback"], {"usd_per_day": 100, "usd_per_month": 1000}),
        "thrifty": ("mxk_gw-thrifty", ["route"], {"usd_per_day": 1e-7}),
        "strict": ("mxk_gw-strict", ["route"], {"usd_per_month": 1e-7, "when_exhausted": "reject"})}
TINY = "meta/llama-2-70b-chat"  # given a context window of 8 tokens: no prompt fits it
CHAT = [{"role": "user", "content": PROMPT}]


def with_curve(src: Path, models: list[str], dst: Path) -> Path:
    """The router at `src` saved to `dst` with a synthetic operating curve (spend falls as lambda grows)."""
    from mixllm_jax.store import checkpoint
    from mixllm_jax.core.budget import OperatingCurve

    router, _ = checkpoint.restore_router(src)
    ref = {m: 1e-3 if m == "gpt-4-1106-preview" else 1e-4 for m in models}
    curve = OperatingCurve((0.0, 10.0, 100.0, 1000.0, 1e9), (1e-3, 6e-4, 3e-4, 1e-4, 5e-5),
                           (0.80, 0.78, 0.72, 0.60, 0.50), ref, 100)
    checkpoint.save_router(dataclasses.replace(router, curve=curve), dst)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory, served_router, stub_backend):
    ck, models = served_router
    tmp = tmp_path_factory.mktemp("gateway")
    keys = tmp / "keys.json"
    write_keys(keys, KEYS)
    backends = write_backends(tmp / "backends.yaml", stub_backend, models)
    doc = json.loads(backends.read_text())
    doc["backends"][TINY]["context_window"] = 8
    backends.write_text(json.dumps(doc))
    server = ServerProc(tmp, with_curve(ck, models, tmp / "ck"), backends, key=KEYS["admin"][0],
                        extra_args=["--api-keys", str(keys)])
    try:
        server.start()
        yield {"server": server, "models": models, "tmp": tmp, "stub": stub_backend}
    finally:
        server.kill()


@pytest.fixture
def srv(env) -> ServerProc:
    return env["server"]


def chat(srv, key="team", **body):
    return srv.post("/v1/chat/completions", {"messages": CHAT, **body}, key=KEYS[key][0])


def route(srv, key="team", **body):
    return srv.post("/v1/route", {"prompt": PROMPT, "book_load": False, **body}, key=KEYS[key][0])


def test_models_list_is_openai_format_with_router_aliases(env, srv):
    r = srv.get("/v1/models", key=KEYS["team"][0])
    assert r.status_code == 200
    doc = r.json()
    assert doc["object"] == "list" and doc["data"][0]["id"] == "mixllm"
    assert "mixllm:budget=<share>" in doc["data"][0]["operating_points"]
    llms = [m for m in doc["data"] if m["kind"] == "llm"]
    assert [m["id"] for m in llms] == env["models"]
    assert all(m["object"] == "model" and isinstance(m["owned_by"], str) for m in doc["data"])
    assert {m["id"]: m["context_window"] for m in llms}[TINY] == 8
    assert "http" not in r.text and "base_url" not in r.text


def test_model_field_selects_the_operating_point_or_pins(env, srv):
    costs = {m: v["cost"] for m, v in route(srv).json()["explanation"].items() if m != TINY}
    cheapest = min(costs, key=costs.get)
    assert route(srv, model="mixllm:cost_weight=1e9").json()["model"] == cheapest
    assert route(srv, model="mixllm:budget=0.05").json()["model"] == cheapest  # the curve's cheap end: lambda 1e9
    for alias in ("mixllm", "auto"):
        assert route(srv, model=alias).json()["model"] == route(srv).json()["model"]
    pinned = chat(srv, model="gpt-4-1106-preview")
    assert pinned.status_code == 200 and pinned.headers["x-mixllm-model"] == "gpt-4-1106-preview"
    expl = route(srv, model="claude-v2").json()["explanation"]
    assert [m for m, v in expl.items() if v["eligible"]] == ["claude-v2"]
    for bad, needle in [("gpt-9", "unknown model 'gpt-9'"), ("mixllm:budget=0", "(0, 10]"),
                        ("mixllm:cost_weight=-1", "cost_weight"), ("mixllm:speed=2", "unknown model")]:
        r = chat(srv, model=bad)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "model"
    r = chat(srv, model="mixllm:budget=0.5", cost_weight=1.0)
    assert r.status_code == 400 and "not both" in r.text


def test_candidates_per_request(env, srv):
    allowed = ["claude-v2", "mistralai/mixtral-8x7b-chat"]
    r = route(srv, allowed_models=allowed).json()
    assert r["model"] in allowed and {m for m, v in r["explanation"].items() if v["eligible"]} <= set(allowed)
    blocked = route(srv, blocked_models=[m for m in env["models"] if m != "claude-v2"]).json()
    assert blocked["model"] == "claude-v2"
    c = chat(srv, allowed_models=["claude-v1"])
    assert c.status_code == 200 and c.headers["x-mixllm-model"] == "claude-v1"
    for body, needle in [({"allowed_models": ["claude-v2", "nope-1", "nope-2"]}, "['nope-1', 'nope-2']"),
                         ({"blocked_models": ["nope-3"]}, "nope-3"),
                         ({"allowed_models": ["claude-v2"], "blocked_models": ["claude-v2"]}, "no candidate"),
                         ({"allowed_models": []}, "no candidate"),
                         ({"allowed_models": "claude-v2"}, "must be a list"),
                         ({"model": "claude-v2", "blocked_models": ["claude-v2"]}, "excluded")]:
        for resp in (route(srv, **body), chat(srv, **body)):
            assert resp.status_code == 400 and needle in resp.json()["error"]["message"], (body, resp.text)


def test_context_window_makes_an_llm_ineligible(env, srv):
    compiled = srv.get("/healthz").json()["compiled_route_shapes"]
    for _ in range(3):
        r = route(srv, model="mixllm:cost_weight=0").json()
        assert r["model"] != TINY and r["explanation"][TINY]["eligible"] is False
    r = chat(srv, model=TINY)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = route(srv, allowed_models=[TINY])
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    # masks, caps, operating points and windows are traced inputs: none of this compiled anything new
    assert srv.get("/healthz").json()["compiled_route_shapes"] == compiled


def spend(srv, key) -> dict:
    """GET /v1/usage as `key`: {key name: its usage view}."""
    r = srv.get("/v1/usage", key=KEYS[key][0])
    assert r.status_code == 200, r.text
    return {u["key"]: u for u in r.json()["data"]}


def settled_spend(srv, key, name, above=0.0) -> dict:
    """The usage of key `name` once its spend exceeds `above` (usage records land just after the answer)."""
    import time

    for _ in range(100):  # bounded
        u = spend(srv, key)[name]
        if u["spend_usd"] > above:
            return u
        time.sleep(0.05)
    raise AssertionError(f"no spend recorded for {name}: {u}")


def test_spend_per_key_and_budgets(env, srv):
    before = spend(srv, "admin")
    assert set(before) == set(KEYS)  # admin sees every key
    assert set(spend(srv, "team")) == {"team"}  # a key sees its own
    r = chat(srv, key="thrifty")
    assert r.status_code == 200
    model = r.headers["x-mixllm-model"]
    u = settled_spend(srv, "thrifty", "thrifty")
    assert u["calls"] == 1 and u["spend_by_model"][model] == u["spend_usd"] > 0 and u["decisions"][model] == 1
    assert u["budget"]["remaining_usd"] < 0 and u["today_usd"] == u["spend_usd"]
    # exhausted, "cheapest": every later decision takes the cheapest eligible LLM
    costs = {m: v["cost"] for m, v in route(srv, key="team").json()["explanation"].items()}
    after = route(srv, key="thrifty").json()
    assert [m for m, v in after["explanation"].items() if v["eligible"]] == [after["model"]]
    assert after["model"] == min((m for m in costs if m != TINY), key=costs.get)
    # "reject": 429 once what is left cannot cover a call's reservation (issue 24: here, the first)
    r = chat(srv, key="strict")
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exhausted"
    assert "reservation of USD" in r.json()["error"]["message"]
    assert spend(srv, "strict")["strict"]["calls"] == 0
    # Prometheus: spend and decisions per key and LLM
    assert srv.metric("mixllm_spend_usd_total", key="thrifty", model=model) == pytest.approx(u["spend_usd"])
    assert srv.metric("mixllm_key_decisions_total", key="thrifty") >= 2


def test_readme_curl_examples_run_as_written(env, srv):
    """Every curl command of the gateway examples (docs/gateway.md), sent as written (method, path,
    headers, body) with $MIXLLM_KEY the team key, answers the status its comment names."""
    text = (REPO / "docs" / "gateway.md").read_text()
    block = re.search(r"<!-- gateway-examples -->\n```sh\n(.*?)```", text, re.S)[1]
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl ")]
    assert len(commands) >= 8
    for cmd in commands:
        cmd, expected = cmd.split("# -> ")
        status = int(expected.split(":")[0].split()[0])
        args = shlex.split(cmd.replace("$MIXLLM_KEY", KEYS["team"][0]))
        url = next(a for a in args if a.startswith("localhost:8000/"))
        headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args) if a == "-H"))
        data = args[args.index("-d") + 1] if "-d" in args else None
        r = httpx.request("POST" if data else "GET", srv.url + url[len("localhost:8000"):], headers=headers,
                          content=data, timeout=60)
        assert r.status_code == status, (cmd, r.text[:500])


def test_spend_survives_restarts(env, srv):
    before = settled_spend(srv, "admin", "team")
    assert srv.stop(signal.SIGTERM) == 0  # checkpoint: spend.json
    assert json.loads((env["tmp"] / "serve" / "spend.json").read_text())["accounts"]["team"]["calls"] == before["calls"]
    srv.start()
    assert spend(srv, "admin")["team"]["spend_usd"] == pytest.approx(before["spend_usd"])
    assert chat(srv).status_code == 200
    more = settled_spend(srv, "admin", "team", above=before["spend_usd"] * (1 + 1e-9))
    srv.stop(signal.SIGKILL)  # the last call's spend is only in the journal
    srv.start()
    again = spend(srv, "admin")["team"]
    assert again["spend_usd"] == pytest.approx(more["spend_usd"]) and again["calls"] == more["calls"]
    assert srv.metric("mixllm_spend_usd_total", key="team") == pytest.approx(more["spend_usd"])
    assert srv.stop(signal.SIGTERM) == 0

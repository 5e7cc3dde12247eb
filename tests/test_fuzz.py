"""Property-based fuzzing (hypothesis) of every boundary: the HTTP endpoints, the loaders and the
checked engine entry points. Deterministic (derandomized), about 1,600 generated cases per run.

* HTTP (conftest.secure_env: the server with API keys): hostile and valid requests on every
  endpoint, with every key, content type and body shape (malformed, deep, huge integers, NaN,
  lone surrogates, poison names and prices, SSRF backends, ...). Every answer is < 500; every
  rejected request (4xx) leaves the journal sequence number and the admin digest of the learned
  state unchanged, and after the hostile run 20 fixed decisions are the same as before it.
* Loaders: JSONL, models files and RouterBench CSVs built from valid records with fields replaced
  by hostile values or bytes: a Dataset or a DataError naming the file, never another exception.
* engine.route / engine.update on hostile arrays: a result or a ValueError; the input state is
  unchanged and an accepted result is finite.

The counts by status code / outcome are printed at the end of the pytest run (conftest.py) and
written to <pytest tmp>/fuzz-counts.json.
"""

from __future__ import annotations

import collections
import json
import math
import re
import urllib.parse

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import TEST_KEYS  # noqa: E402

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def fuzz(n: int):
    """The suite's settings with `n` generated cases."""
    return settings(FUZZ, max_examples=n)


N_HOSTILE, N_VALID, N_JSONL, N_MODELS, N_CSV, N_ROUTE, N_UPDATE = 500, 300, 250, 120, 120, 160, 160

PROMPTS20 = [f"{w} question number {i}: which of these is a mammal? (A) shark (B) whale" for i, w in
             enumerate(["First", "Second", "Third", "Fourth", "Fifth"] * 4)]
LEARNED = ("quality", "tokens", "cost", "uncertainty", "feedback")  # load-independent parts of a decision


@pytest.fixture(scope="module")
def counts(request, tmp_path_factory):
    """{suite: Counter of status codes / outcomes}, reported by conftest's terminal summary."""
    c = collections.defaultdict(collections.Counter)
    request.config._mixllm_fuzz_counts = c
    yield c
    out = tmp_path_factory.getbasetemp() / "fuzz-counts.json"
    out.write_text(json.dumps({k: dict(v) for k, v in c.items()}, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# JSON fragments: raw JSON text, so NaN, 1e400, 401-digit integers and lone surrogates can be sent


def j(v) -> str:
    return json.dumps(v)


SPECIAL = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "3.5e38", "1e39", "1e-400",
                           "-0.0", "0.5", "1", "0", "-1", "1e300", "1e-300", "2.5", "9" * 41,
                           "-" + "1" * 401, "1" * 401, "1" * 5000])
SURROGATES = st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\u0000"', '"x\\ud83d"',
                              '"' + "x" * 5000 + '"', '""', '" "', '"\\n"'])
SCALAR = st.one_of(st.none().map(j), st.booleans().map(j), st.integers(-10 ** 6, 10 ** 6).map(str),
                   st.floats(allow_nan=False, allow_infinity=False).map(j), SPECIAL,
                   st.text(max_size=20).map(j), SURROGATES)
KEYS = st.one_of(st.sampled_from(["prompt", "cost_weight", "max_cost_usd", "allowed_models", "blocked_models",
                                  "budget", "book_load", "request_id", "quality",
                                  "thumbs", "completion_tokens", "name", "price_in_per_mtok", "price_out_per_mtok",
                                  "ttft_s", "tokens_per_s", "max_concurrency", "prior", "backend", "messages",
                                  "stream", "base_url", "api_key_env", "timeout_s", "context_window", "model", "role",
                                  "content"]),
                 st.text(max_size=8))


def obj(items: dict) -> str:
    return "{" + ",".join(f"{j(k)}:{v}" for k, v in items.items()) + "}"


VALUE = st.recursive(SCALAR, lambda kids: st.one_of(
    st.lists(kids, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.dictionaries(KEYS, kids, max_size=4).map(obj)), max_leaves=8)
DEEP = st.integers(60, 3000).map(lambda n: "[" * n + "]" * n)


def weighted(good, bad, p_good: float):
    """`good` with probability p_good (in tenths), else `bad`."""
    k = round(10 * p_good)
    return st.sampled_from([True] * k + [False] * (10 - k)).flatmap(lambda g: good if g else bad)


def field(valid, p_good: float):
    """A field's raw JSON value: a valid one, or a hostile one."""
    return weighted(valid.map(j), VALUE, p_good)


def body_of(fields: dict, required=(), p_good: float = 0.9):
    """A JSON object of `fields` (name -> strategy of raw JSON values): the required ones and a
    random subset of the others, plus (rarely) an unknown key; or (rarely) any subset."""
    req = {k: v for k, v in fields.items() if k in required}
    opt = {k: v for k, v in fields.items() if k not in required}
    base = weighted(st.fixed_dictionaries(req, optional=opt), st.fixed_dictionaries({}, optional=fields), p_good)
    extra = weighted(st.just({}), st.dictionaries(KEYS, VALUE, min_size=1, max_size=1), p_good)
    return st.tuples(base, extra).map(lambda t: obj({**t[1], **t[0]}))


TEXT = st.text(st.characters(codec="utf-8"), min_size=0, max_size=60)
PROMPT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=60).filter(lambda t: t.strip())
NAME = st.from_regex(r"fz-[a-z0-9][a-z0-9._-]{0,12}", fullmatch=True)
HOSTILE_NAME = st.one_of(NAME, st.text(max_size=10), st.sampled_from(["\\ud800", "a b", "../x", "m" * 200, ""]))
RID = st.integers(0, 10 ** 6).map(lambda i: f"@@rid{i}@@")  # a request id routed earlier (Observer.send)


def gateway_fields(models, p):
    """The gateway's request fields (gateway.py): model (aliases, operating points, pinned LLMs,
    unknown names), max_cost_usd, allowed_models / blocked_models (known and unknown names)."""
    llm = st.sampled_from(models)
    model = st.one_of(st.sampled_from(["mixllm", "auto", "mixllm:cost_weight=0.5", "mixllm:budget=0.2",
                                       "mixllm:budget=0", "mixllm:budget=1e400", "mixllm:cost_weight=-1",
                                       "mixllm:nope=1", "gpt-unknown"]), llm)
    names = st.lists(st.one_of(llm, llm, st.sampled_from(["no-such-llm", ""])), max_size=4)
    return {"model": field(model, p), "max_cost_usd": field(st.floats(1e-6, 1), p),
            "allowed_models": field(names, p), "blocked_models": field(names, p)}


def route_body(models, p):
    return body_of({"prompt": field(st.one_of(PROMPT, st.lists(PROMPT, min_size=1, max_size=8)), p),
                    "cost_weight": field(st.floats(0, 1e3), p), **gateway_fields(models, p),
                    "book_load": field(st.booleans(), p)}, ("prompt",), p)


def chat_body(models, p):
    msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": TEXT})
    user = st.fixed_dictionaries({"role": st.just("user"), "content": PROMPT})
    msgs = st.tuples(st.lists(msg, max_size=2), user).map(lambda t: t[0] + [t[1]])
    return body_of({"messages": field(msgs, p), "stream": field(st.booleans(), p),
                    "cost_weight": field(st.floats(0, 1e3), p), **gateway_fields(models, p),
                    "temperature": st.floats(0, 2).map(j), "user": TEXT.map(j)}, ("messages",), p)


def feedback_body(p):
    return body_of({"request_id": field(weighted(RID, st.text(max_size=12), p), p),
                    "quality": field(st.floats(0, 1), p), "thumbs": field(st.sampled_from(["up", "down"]), p),
                    "completion_tokens": field(st.integers(0, 10 ** 5), p)}, ("request_id", "quality"), p)


def models_body(stub_host, p):
    good_url = st.just(f"http://{stub_host}/ok/v1")
    bad_url = st.sampled_from(["http://169.254.169.254/latest", "http://127.0.0.1:1/v1", "ftp://x/y",
                               f"http://u:p@{stub_host}/ok/v1", "http://[::1]:9/v1", "not a url",
                               f"http://{stub_host}/ok/v1?x=1"])
    backend = st.fixed_dictionaries({"base_url": weighted(good_url, bad_url, p)},
                                    optional={"model": PROMPT, "timeout_s": st.floats(0.1, 5),
                                              "context_window": weighted(st.integers(1, 10 ** 6), VALUE, p)})
    backend = weighted(backend, backend.map(lambda b: {**b, "api_key_env": "HOME"}), p)
    name = weighted(NAME.map(j), st.one_of(HOSTILE_NAME.map(lambda n: '"' + n + '"'), VALUE), p)
    return body_of({"name": name, "price_in_per_mtok": field(st.floats(0, 100), p),
                    "price_out_per_mtok": field(st.floats(0, 100), p), "ttft_s": field(st.floats(0, 10), p),
                    "tokens_per_s": field(st.floats(1, 500), p), "max_concurrency": field(st.integers(1, 8), p),
                    "prior": field(st.one_of(st.sampled_from(["uninformative", "mean"]), st.floats(-1, 2)), p),
                    "backend": field(backend, p)}, ("name", "price_in_per_mtok", "price_out_per_mtok"), p)


def request(stub_host, models, hostile=True):
    """(method, path, headers, body bytes or None) of one generated request."""
    p = 0.6 if hostile else 0.9
    key = st.sampled_from(["admin"] * 6 + ["route", "feedback", "client", "none", "bad"]) if hostile else \
        st.sampled_from(["admin"] * 8 + ["client", "route"])
    ctype = st.sampled_from(["application/json"] * 8 + ["text/plain", None, "application/json; charset=utf-8"]) \
        if hostile else st.just("application/json")
    posts = {"/v1/route": route_body(models, p), "/v1/chat/completions": chat_body(models, p),
             "/v1/feedback": feedback_body(p),
             "/v1/models": models_body(stub_host, p)}
    raw = st.one_of(st.binary(max_size=64), DEEP, VALUE, st.just(""), SCALAR)

    def body_for(path):
        return weighted(posts[path], raw, 0.75) if hostile else posts[path]

    post = st.sampled_from(sorted(posts)).flatmap(lambda p: body_for(p).map(lambda b: ("POST", p, b)))
    gets = st.sampled_from(["/v1/models", "/v1/usage", "/v1/policy", "/healthz", "/metrics", "/healthz?digest=1", "/v1/route",
                            "/nope", "/v1/models/x/y", "/%ff%fe"]).map(lambda p: ("GET", p, None))
    dels = HOSTILE_NAME.map(lambda n: ("DELETE", "/v1/models/" + urllib.parse.quote(n.replace("\\", "")), None))
    prices = body_of({"price_in_per_mtok": field(st.floats(0, 1e5), 0.7),
                      "price_out_per_mtok": field(st.floats(0, 1e5), 0.7)}, ("price_in_per_mtok", "price_out_per_mtok"), 0.7)
    patches = st.tuples(HOSTILE_NAME, weighted(prices, raw, 0.6)).map(  # (names no LLM has: nothing accepted)
        lambda a: ("PATCH", "/v1/models/" + urllib.parse.quote(a[0].replace("\\", "")), a[1]))
    policy = body_of({"budget": field(st.sampled_from(["25%", "0.1", "150%", "0"]), 0.7),
                      "budget_usd": field(st.floats(0, 1), 0.7), "cost_weight": field(st.floats(0, 1e3), 0.7),
                      "reference": field(st.sampled_from(models), 0.7)}, (), 0.7)
    puts = weighted(policy, raw, 0.6).map(lambda b: ("PUT", "/v1/policy", b))
    what = (st.one_of(post, post, post, post, gets, dels, patches, puts) if hostile
            else st.one_of(post, post, post, gets))

    def build(args):
        (method, path, body), k, ct = args
        headers = {}
        if k != "none":
            headers["authorization"] = "Bearer " + (TEST_KEYS.get(k) or "wrong-key")
        if ct is not None and method in ("POST", "PATCH", "PUT"):
            headers["content-type"] = ct
        data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        return method, path, headers, data

    return st.tuples(what, key, ctype).map(build)


# ---------------------------------------------------------------------------------------------
# HTTP


class Observer:
    """Sends requests, counts statuses, and checks that rejections leave no trace."""

    def __init__(self, srv, counts):
        self.srv, self.counts = srv, counts
        self.client = __import__("httpx").Client(base_url=srv.url, timeout=60)
        self.base = None  # (journal seq, state digest) after the last accepted change
        self.accepted_changes = 0
        self.rids = []  # request ids routed so far: @@ridN@@ in a body stands for one of them
        self.collect_rids = True

    def snapshot(self, settle=True):
        """(journal seq, state digest, capacity, models); with `settle`, once the journal is applied
        and two reads agree (a usage record of an answered chat may still be on its way)."""
        prev = None
        for _ in range(100):  # bounded
            h = self.client.get("/healthz?digest=1", headers=self.srv.headers()).json()
            cur = (h["journal_seq"], h["state_digest"], h["capacity"], tuple(h["models"]))
            if not settle or (h["journal_seq"] == h["applied_seq"] and cur == prev):
                return cur
            prev = cur
        raise AssertionError(f"the journal did not settle: {h}")

    def decisions(self) -> dict:
        r = self.client.post("/v1/route", json={"prompt": PROMPTS20[:8], "book_load": False},
                             headers=self.srv.headers())
        routes = r.json()["routes"]
        for i in (8, 16):
            routes += self.client.post("/v1/route", json={"prompt": PROMPTS20[i:i + 8][:4 if i == 16 else 8],
                                                          "book_load": False},
                                       headers=self.srv.headers()).json()["routes"]
        return [{m: {k: v[k] for k in LEARNED} for m, v in rt["explanation"].items()} for rt in routes]

    def send(self, suite, method, path, headers, data):
        if self.base is None:
            self.base = self.snapshot()
        if data and b"@@rid" in data:
            data = re.sub(rb"@@rid(\d+)@@", lambda m: (self.rids[int(m[1]) % len(self.rids)] if self.rids
                                                         else "req-none").encode(), data)
        r = self.client.request(method, path, headers=headers, content=data)
        if r.status_code == 200 and path == "/v1/route" and self.collect_rids:
            out = r.json()
            self.rids += [x["request_id"] for x in out.get("routes", [out])][:8]
        self.counts[suite][r.status_code] += 1
        assert r.status_code < 500, (method, path, data[:300] if data else None, r.status_code, r.text[:500])
        if r.status_code >= 400:
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
            assert body is None or set(body["error"]) >= {"message", "type"}, r.text[:300]
            assert self.snapshot(settle=False) == self.base, ("a rejected request changed the state", method, path,
                                                  data[:300] if data else None, r.status_code, r.text[:300])
            return r
        if method == "POST" and path == "/v1/models":  # undo: keep the model count and capacity bounded
            d = self.client.delete("/v1/models/" + r.json()["id"], headers=self.srv.headers())
            assert d.status_code == 200, d.text
        if method in ("DELETE", "PATCH", "PUT") or path in ("/v1/models", "/v1/feedback"):
            self.accepted_changes += 1
        if method in ("DELETE", "PATCH", "PUT") or path in ("/v1/models", "/v1/feedback", "/v1/chat/completions"):
            self.base = self.snapshot()  # an accepted change (or a chat's usage record): the new baseline
        return r


@pytest.mark.slow
def test_fuzz_http_hostile_requests(secure_env, counts):
    """Hostile requests on every endpoint: never a 5xx; a rejection changes nothing; 20 fixed
    decisions are the same after the run (no feedback can be accepted here: request ids are made up)."""
    srv = secure_env["server"]
    obs = Observer(srv, counts)
    obs.collect_rids = False  # feedback names made-up request ids only: none can be accepted
    stub_host = secure_env["stub"].split("//", 1)[1]
    before = obs.decisions()

    @fuzz(N_HOSTILE)
    @given(request(stub_host, secure_env["models"], hostile=True))
    def run(req):
        obs.send("http_hostile", *req)

    run()
    reset = obs.client.put("/v1/policy", json={"cost_weight": 0.0}, headers=srv.headers())  # the fixture's point
    assert reset.status_code == 200, reset.text
    after = obs.decisions()
    names = set(before[0])
    assert [{m: v for m, v in d.items() if m in names} for d in after] == before
    assert sum(counts["http_hostile"].values()) >= N_HOSTILE


@pytest.mark.slow
def test_fuzz_http_valid_and_hostile_traffic(secure_env, counts):
    """Mostly well-formed traffic with real request ids: feedback and model changes are accepted
    (then the baseline moves), every rejection still changes nothing, and nothing answers 5xx."""
    srv = secure_env["server"]
    obs = Observer(srv, counts)
    stub_host = secure_env["stub"].split("//", 1)[1]
    obs.rids = [r["request_id"] for r in obs.client.post(
        "/v1/route", json={"prompt": [f"seed prompt {i}" for i in range(8)], "book_load": False},
        headers=srv.headers()).json()["routes"]]

    @fuzz(N_VALID)
    @given(request(stub_host, secure_env["models"], hostile=False))
    def run(req):
        obs.send("http_valid", *req)

    run()
    assert obs.accepted_changes > 0
    h = obs.client.get("/healthz", headers=srv.headers()).json()
    assert h["models"] == secure_env["models"]  # every model a case added was removed again
    assert obs.client.post("/v1/route", json={"prompt": "still fine?"}, headers=srv.headers()).status_code == 200


# ---------------------------------------------------------------------------------------------
# Loaders

MODELS = [{"name": "big", "price_in_per_mtok": 10.0, "price_out_per_mtok": 30.0},
          {"name": "small", "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0, "ttft_s": 0.5}]
RECORD = {"query_id": "q1", "prompt": "What is 2+2?", "model": "big", "quality": 1.0, "cost": 0.001,
          "prompt_tokens": 10, "completion_tokens": 5, "latency_s": 1.0, "tags": ["math"], "split": "train"}


def mutated(record: dict):
    """A record with some fields replaced by hostile raw JSON values or dropped, as one line."""
    def line(args):
        drop, repl = args
        return obj({**{k: j(v) for k, v in record.items() if k not in drop}, **repl})
    return st.tuples(st.sets(st.sampled_from(sorted(record)), max_size=2),
                     st.dictionaries(st.sampled_from(sorted(record)), st.one_of(VALUE, SPECIAL), max_size=2)).map(line)


def jsonl_file():
    good = st.builds(lambda q, m, qual: {**RECORD, "query_id": f"q{q}", "model": m, "quality": qual,
                                         "prompt": f"prompt {q}"},
                     st.integers(0, 4), st.sampled_from(["big", "small"]), st.floats(0, 1))
    line = st.one_of(good.map(lambda r: j(r).encode()), good.flatmap(mutated).map(lambda s: s.encode("utf-8", "surrogatepass")),
                     st.binary(max_size=40), st.just(b"\xff\xfe{}"), st.just(b""))
    return st.lists(line, min_size=1, max_size=6).map(lambda ls: b"\n".join(ls) + b"\n")


def _outcome(suite, counts, fn):
    from mixllm_jax.data import DataError

    try:
        ds = fn()
    except DataError as e:
        msg = str(e)
        assert e.path and len(msg) < 2000, msg
        counts[suite]["DataError"] += 1
        return None
    counts[suite]["ok"] += 1
    return ds


def test_fuzz_jsonl_loader(tmp_path_factory, counts):
    from mixllm_jax.data import ModelSpec, load_jsonl

    specs = [ModelSpec(**m) for m in MODELS]
    d = tmp_path_factory.mktemp("fuzz-jsonl")

    @fuzz(N_JSONL)
    @given(jsonl_file(), st.sampled_from(["raise", "skip"]))
    def run(blob, on_error):
        path = d / "log.jsonl"
        path.write_bytes(blob)
        ds = _outcome("jsonl_loader", counts, lambda: load_jsonl(path, specs, on_error=on_error))
        if ds is not None and len(ds):
            for a in (ds.cost, ds.completion_tokens, ds.prompt_tokens, ds.quality):
                v = a[~np.isnan(a)]
                assert np.all(np.isfinite(v)) and np.all(np.abs(v) < 1e9)

    run()


def test_fuzz_models_file(tmp_path_factory, counts):
    from mixllm_jax.data import load_models

    d = tmp_path_factory.mktemp("fuzz-models")
    model = weighted(st.sampled_from(MODELS).map(j), st.one_of(st.sampled_from(MODELS).flatmap(mutated), VALUE), 0.5)
    doc = st.one_of(st.lists(model, max_size=3).map(lambda ms: '{"models": [' + ",".join(ms) + "]}"),
                    VALUE, DEEP)

    @fuzz(N_MODELS)
    @given(st.one_of(doc.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=60)))
    def run(blob):
        path = d / "models.json"
        path.write_bytes(blob)
        specs = _outcome("models_file", counts, lambda: load_models(path))
        for s in specs or []:
            assert math.isfinite(s.price_in) and math.isfinite(s.price_out) and s.name.isprintable()

    run()


CSV_HEADER = "sample_id,prompt,eval_name," + ",".join(f"{m},{m}|total_cost,{m}|model_response" for m in ("big", "small"))
CELL = st.one_of(st.sampled_from(["1", "0", "0.5", "nan", "inf", "-1", "1e30", "1" * 401, "", "x", '"', "\x00"]),
                 st.text(max_size=6))


def csv_file():
    good = st.builds(lambda i: [f"s{i}", repr([f"prompt {i}"]), "task", "1", "0.001", "A", "0", "0.0001", "A"],
                     st.integers(0, 5))

    def mutate(args):
        row, repl = args
        for k, v in repl.items():
            row[k % len(row)] = v
        return ",".join(f'"{c}"' if "," in c else c for c in row)

    row = st.tuples(good, st.dictionaries(st.integers(0, 8), CELL, max_size=2)).map(mutate)
    body = st.lists(st.one_of(row, row, row, st.text(max_size=20)), max_size=4)
    return body.map(lambda rows: (CSV_HEADER + "\n" + "".join(r + "\n" for r in rows)).encode("utf-8", "surrogatepass"))


def test_fuzz_routerbench_csv(tmp_path_factory, counts):
    from mixllm_jax.data import load_routerbench

    d = tmp_path_factory.mktemp("fuzz-csv")
    (d / "models.json").write_text(json.dumps({"models": MODELS}))

    @fuzz(N_CSV)
    @given(st.one_of(csv_file(), csv_file(), st.binary(max_size=80)))
    def run(blob):
        (d / "task_train.csv").write_bytes(blob)
        ds = _outcome("routerbench_csv", counts, lambda: load_routerbench(d, split="train"))
        if ds is not None and len(ds):
            assert np.all(np.isfinite(ds.cost)) and np.all(ds.cost <= 1e4)

    run()


# ---------------------------------------------------------------------------------------------
# Checked engine entry points

DIM, CAP = 6, 4


def numbers(shape_hint):
    """A hostile array-like: floats with NaN/inf/huge, huge Python ints, strings, ragged lists, or
    a well-formed array of the wanted shape."""
    n, tail = shape_hint
    elem = st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([1e30, -1e30, 3.5e38, 1e-45, 10 ** 400, -(10 ** 40), 0]))
    good = st.lists(st.lists(st.floats(-3, 3), min_size=tail, max_size=tail) if tail else st.floats(0, 100),
                    min_size=n, max_size=n)
    bad = st.one_of(
        st.lists(st.lists(elem, min_size=tail, max_size=tail) if tail else elem, min_size=n, max_size=n),
        st.lists(st.lists(elem, min_size=0, max_size=tail + 2) if tail else elem, min_size=0, max_size=n + 2),
        st.sampled_from(["text", None, [["a", "b"]], [], [[]], np.zeros((n, tail + 1) if tail else (n + 1,)),
                         np.zeros((n, tail), np.complex64) if tail else np.zeros(n, np.complex64),
                         np.full((n, tail) if tail else (n,), np.nan)]))
    return weighted(good, bad, 0.8)


@pytest.fixture(scope="module")
def engine_state():
    from conftest import make_state

    st_ = make_state(capacity=CAP, dim=DIM, n_active=3)
    return st_


def _digest(state) -> str:
    import hashlib

    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def test_fuzz_engine_route(engine_state, counts):
    from mixllm_jax.core import engine
    from mixllm_jax.core.policy import Policy

    digest = _digest(engine_state)
    knobs = st.tuples(*[st.floats(0, 10)] * 4, st.floats(0, 1))
    bad_knobs = st.tuples(*[st.one_of(st.floats(0, 10), st.sampled_from([-1.0, math.inf, math.nan, 1e300, 10 ** 40]))] * 4,
                          st.one_of(st.floats(0, 1), st.just(2.0)))
    pol = weighted(knobs, bad_knobs, 0.8).map(
        lambda k: Policy(cost_weight=k[0], alpha=k[1], beta=k[2], tau=k[3], mix=k[4]))

    @fuzz(N_ROUTE)
    @given(st.integers(1, 8).flatmap(lambda n: st.tuples(numbers((n, DIM)), numbers((n, 0)), pol,
                                                          weighted(st.none(), numbers((n, CAP)), 0.5))))
    def run(args):
        x, pt, policy, bonus = args
        try:
            d = engine.route(engine_state, x, pt, policy, bonus)
        except ValueError:
            counts["engine_route"]["ValueError"] += 1
        else:
            counts["engine_route"]["ok"] += 1
            active = np.asarray(engine_state.active)
            assert np.all(active[np.asarray(d.arm)])
            assert np.all(np.isfinite(np.asarray(d.score)[:, active]))
        assert _digest(engine_state) == digest

    run()


def test_fuzz_engine_update(engine_state, counts):
    from mixllm_jax.core import engine

    digest = _digest(engine_state)
    arm = lambda n: weighted(  # noqa: E731
        st.lists(st.integers(0, 2), min_size=n, max_size=n).map(lambda a: np.array(a, np.int32)),
        st.one_of(st.lists(st.integers(-5, 10 ** 20), min_size=0, max_size=n + 1),
                  st.sampled_from([np.zeros(n), "0", None, [10 ** 400] * n, np.full(n, 3)])), 0.8)

    @fuzz(N_UPDATE)
    @given(st.integers(1, 8).flatmap(lambda n: st.tuples(numbers((n, DIM)), arm(n), numbers((n, 2)),
                                                          weighted(st.none(), numbers((n, 0)), 0.5))))
    def run(args):
        x, a, y, w = args
        try:
            new = engine.update(engine_state, x, a, y, w)
        except ValueError:
            counts["engine_update"]["ValueError"] += 1
        else:
            counts["engine_update"]["ok"] += 1
            for f in ("A", "A_inv", "B", "count"):
                assert np.all(np.isfinite(np.asarray(getattr(new, f)))), f
        assert _digest(engine_state) == digest

    run()


def test_fuzz_ran_enough_cases(counts):
    """At least 1,000 generated cases in this module (when the HTTP part ran too)."""
    total = sum(sum(c.values()) for c in counts.values())
    http = sum(sum(counts[k].values()) for k in ("http_hostile", "http_valid"))
    assert total >= (1000 if http else 500), dict(counts)

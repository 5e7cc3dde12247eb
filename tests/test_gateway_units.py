"""The gateway's pieces without a server: the price catalog, key budgets, the spend ledger, the
`model` field and candidate parsing, backends' context windows (issue 17; end-to-end in
test_gateway.py)."""

from __future__ import annotations

import datetime
import json
import types

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("yaml")

from mixllm_jax.serve.auth import ApiKey, KeyBudget, hash_key, load_keys  # noqa: E402
from mixllm_jax.serve.http import ApiError  # noqa: E402
from mixllm_jax.serve.spend import Ledger, cost_cap, usage_view  # noqa: E402


def test_catalog_loads_and_validates():
    from mixllm_jax import data
    from mixllm_jax.catalog import PROVIDERS, catalog_names, entries

    total = 0
    for name in PROVIDERS:
        rows = entries(name)
        specs = data.load_models(f"catalog:{name}")
        assert [s.name for s in specs] == [r["name"] for r in rows] and len(specs) >= 3
        for r, s in zip(rows, specs):
            assert 0 < s.price_in_per_mtok <= s.price_out_per_mtok < 1000, r  # USD per million tokens
            assert 1000 <= s.context_window <= 10_000_000
            assert datetime.date(2024, 1, 1) <= datetime.date.fromisoformat(r["as_of"]) <= datetime.date.today()
            assert r["source"].startswith("https://") and r["provider"] == name
        total += len(rows)
    assert len(data.load_models("catalog:all")) == total == len(entries("all")) and "all" in catalog_names()
    with pytest.raises(ValueError, match="unknown catalog 'nope'"):
        data.load_models("catalog:nope")


@pytest.mark.parametrize("entry, needle", [
    ({"context_window": 0}, "context_window"),
    ({"context_window": 1.5}, "integer"),
    ({"as_of": 5}, "as_of"),
    ({"source": "x" * 501}, "source"),
])
def test_models_file_checks_the_new_fields(tmp_path, entry, needle):
    from mixllm_jax import data

    p = tmp_path / "models.json"
    p.write_text(json.dumps({"models": [{"name": "m", "price_in_per_mtok": 1, "price_out_per_mtok": 2, **entry}]}))
    with pytest.raises(data.DataError, match=needle):
        data.load_models(p)


def test_key_budgets_in_the_keys_file(tmp_path):
    p = tmp_path / "keys.json"
    p.write_text(json.dumps({"keys": [{"name": "a", "sha256": hash_key("k"), "roles": ["route"],
                                       "budget": {"usd_per_day": 2, "max_cost_usd": 0.5, "when_exhausted": "reject"}}]}))
    [key] = load_keys(p).values()
    assert key.budget == KeyBudget(usd_per_day=2.0, usd_per_month=None, max_cost_usd=0.5, when_exhausted="reject")
    for budget, needle in [({"usd_per_day": -1}, "usd_per_day"), ({"when_exhausted": "panic"}, "when_exhausted"),
                           ({"usd_per_week": 1}, "unknown key"), ("5 USD", "mapping")]:
        p.write_text(json.dumps({"keys": [{"name": "a", "sha256": hash_key("k"), "roles": ["route"],
                                           "budget": budget}]}))
        with pytest.raises(ValueError, match=needle):
            load_keys(p)


DAY1 = datetime.datetime(2026, 1, 31, 12, tzinfo=datetime.timezone.utc).timestamp()
DAY2 = DAY1 + 86400  # February 1st: a new day and a new month


def usage(seq, usd, t=DAY1, key="a", model="m"):
    return {"type": "usage", "seq": seq, "key": key, "model": model, "cost_usd": usd, "t": t}


def test_ledger_counts_each_record_once_by_day_and_month(tmp_path):
    seen = []
    led = Ledger(on_spend=lambda k, m, usd: seen.append((k, m, usd)))
    for rec in (usage(1, 0.5), usage(2, 0.25, model="n"), usage(2, 9.0), usage(3, None), usage(4, 1.0, t=DAY2)):
        led.apply(rec)
    a = led.accounts["a"]
    assert a.spend_usd == 1.75 and a.calls == 3 and a.by_model == {"m": 1.5, "n": 0.25}
    assert a.spent(DAY1) == (0.0, 0.0) and a.spent(DAY2) == (1.0, 1.0)  # day and month rolled over
    led.decision("a", "m")
    path = tmp_path / "spend.json"
    path.write_text(json.dumps(led.to_dict()))
    back = Ledger(on_spend=lambda k, m, usd: seen.append(("reload", m, usd)))
    back.load(path)
    assert back.to_dict() == led.to_dict() and back.seq == 4
    back.apply(usage(4, 5.0))  # already in the file: skipped
    assert back.accounts["a"].spend_usd == 1.75
    assert sorted(x for x in seen if x[0] == "reload") == [("reload", "m", 1.5), ("reload", "n", 0.25)]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="spend.json is damaged"):
        Ledger().load(path)


def test_cost_cap_under_key_budgets():
    led = Ledger()
    led.apply(usage(1, 0.75))
    free = ApiKey("a", frozenset({"route"}))
    assert cost_cap(led, None, None) is None and cost_cap(led, free, 0.1) == 0.1
    day = ApiKey("a", frozenset({"route"}), KeyBudget(usd_per_day=1.0, max_cost_usd=0.5))
    assert cost_cap(led, day, None, now=DAY1) == pytest.approx(0.25)  # what is left today
    assert cost_cap(led, day, 0.1, now=DAY1) == 0.1
    assert cost_cap(led, day, None, now=DAY2) == 0.5  # a new day: the per-request cap
    spent = ApiKey("a", frozenset({"route"}), KeyBudget(usd_per_month=0.5))
    assert cost_cap(led, spent, 0.3, now=DAY1) == 0.0  # exhausted: the cheapest eligible LLM
    reject = ApiKey("a", frozenset({"route"}), KeyBudget(usd_per_month=0.5, when_exhausted="reject"))
    with pytest.raises(ApiError) as e:
        cost_cap(led, reject, None, now=DAY1)
    assert e.value.status == 429 and e.value.code == "budget_exhausted"
    view = usage_view(led, free, {"x": free, "y": ApiKey("b", frozenset({"route"}))}, now=DAY1)
    assert [u["key"] for u in view["data"]] == ["a"]
    admin = ApiKey("ops", frozenset({"admin"}))
    assert [u["key"] for u in usage_view(led, admin, {"x": free, "y": admin})["data"]] == ["a", "ops"]


def test_reservations_are_taken_atomically_and_settled_once():
    """Issue 24 #3: calls reserve their predicted maximum cost (max_tokens, else 4 x the predicted
    completion) against the key's budget; the cap sees reservations and settled-but-unapplied costs;
    a reservation is released once, however often it is released."""
    import concurrent.futures
    import math

    from mixllm_jax.serve.prometheus import Metrics
    from mixllm_jax.serve.spend import RESERVE_FACTOR, Spend

    entry = types.SimpleNamespace(prompt_tokens=100.0, log_tokens=math.log(50.0), observed_tokens=None)
    written = []

    def append(rec):
        written.append(rec)
        f = concurrent.futures.Future()
        f.set_result(len(written))
        return f

    live = types.SimpleNamespace(prices={"m": (1e-6, 2e-6)})
    sp = Spend(live, features={"r1": entry, "r2": entry, "r3": entry}, journal=types.SimpleNamespace(append=append),
               metrics=Metrics(), worker=None, drain=lambda: None)
    assert sp.max_call_cost("r1", "m", {"max_tokens": 10}) == pytest.approx(100e-6 + 20e-6)
    assert sp.max_call_cost("r1", "m", {}) == pytest.approx(100e-6 + RESERVE_FACTOR * 50 * 2e-6)
    assert sp.max_call_cost("r1", "m", {"max_tokens": "x"}) == sp.max_call_cost("r1", "m", {})  # not a bound
    assert sp.max_call_cost("unknown", "m", {}) == 0.0
    reject = ApiKey("k", frozenset({"route"}), KeyBudget(usd_per_day=250e-6, when_exhausted="reject"))
    body = {"max_tokens": 10}  # 120e-6 each: two fit in 250e-6, a third does not
    h1, h2 = sp.reserve(reject, "r1", "m", body), sp.reserve(reject, "r2", "m", body)
    assert sp.held("k") == pytest.approx(240e-6)
    assert cost_cap(sp.ledger, reject, None, held=sp.held("k")) == pytest.approx(10e-6)
    with pytest.raises(ApiError) as e:
        sp.reserve(reject, "r3", "m", body, force=True)  # "reject" is never forced
    assert e.value.status == 429 and "reservation of USD 0.00012" in e.value.message
    cheap = ApiKey("k", frozenset({"route"}), KeyBudget(usd_per_day=250e-6))
    assert sp.reserve(cheap, "r3", "m", body) is None  # "cheapest": the caller routes again at cap 0
    h3 = sp.reserve(cheap, "r3", "m", body, force=True)
    sp.release(h3)
    sp.release(h3)
    assert sp.held("k") == pytest.approx(240e-6)
    sp.record_usage("r1", "m", "k", {"prompt_tokens": 100, "completion_tokens": 5}, 0.1, None, hold=h1)
    assert written[-1]["cost_usd"] == pytest.approx(110e-6)
    assert sp.held("k") == pytest.approx(120e-6 + 110e-6)  # h2 open, r1 settled but not in the ledger yet
    sp.apply(dict(written[-1], seq=1))
    assert sp.held("k") == pytest.approx(120e-6) and sp.ledger.accounts["k"].spend_usd == pytest.approx(110e-6)
    # a stream cut after 7 deltas: billed for the prompt and the 7 relayed, flagged
    sp.record_usage("r2", "m", "k", None, 0.1, 0.01, approx_tokens=7, hold=h2, aborted="client")
    rec = written[-1]
    assert rec["aborted"] == "client" and rec["tokens_approximate"] and rec["cost_source"] == "streamed"
    assert rec["cost_usd"] == pytest.approx(100e-6 + 7 * 2e-6) and rec["completion_tokens"] == 7
    sp.apply(dict(rec, seq=2))
    assert sp.held("k") == 0.0 and not sp.holds and not sp.unsettled


def test_failure_rates_decay():
    from mixllm_jax.serve.live import FailureRates

    fr = FailureRates(half_life_s=10.0)
    assert fr.rate("m") is None
    assert fr.observe("m", True, now=0.0) == 1.0
    assert fr.observe("m", False, now=0.0) == 0.5
    # 10 s later the old calls weigh half: (0.5 fails) / (1 + 1 call)
    assert fr.observe("m", False, now=10.0) == pytest.approx(0.5 / 2.0)
    fr.forget("m")
    assert fr.rate("m") is None


def fake_service(curve=None):
    """The live state (serve.live.Live) the gateway's request checks read."""
    from mixllm_jax.core.config import RouterConfig
    from mixllm_jax.core.policy import Policy
    from mixllm_jax.text.router import Router

    slots = {"big": 0, "small": 1, "mid": 2}
    return types.SimpleNamespace(
        registry=types.SimpleNamespace(slots=slots),
        router=Router(encoder=None, head=None, state=None, registry=None, policy=Policy(), config=RouterConfig(),
                      curve=curve),
        state=types.SimpleNamespace(capacity=4))


def test_model_field():
    from mixllm_jax.core.budget import OperatingCurve
    from mixllm_jax.serve.gateway import parse_model

    svc = fake_service()
    assert parse_model(svc, None) == parse_model(svc, "mixllm") == parse_model(svc, "auto") == (None, None)
    assert parse_model(svc, "mixllm:cost_weight=2.5") == ((2.5, 0.0, 0.0), None)
    assert parse_model(svc, "small") == (None, "small")
    for bad, needle in [("mixllm:budget=0.2", "no operating curve"), ("gpt-9", "unknown model"), (3, "string"),
                        ("mixllm:cost_weight=1e13", "cost_weight"), ("mixllm:budget=nan", "unknown model")]:
        with pytest.raises(ApiError, match=needle) as e:
            parse_model(svc, bad)
        assert e.value.status == 400 and e.value.param == "model"
    with pytest.raises(ApiError, match="does not take pinned"):
        parse_model(fake_service(), "small", pinned_models="refuse")
    curve = OperatingCurve((0.0, 100.0), (1.0, 0.1), (0.9, 0.5), {"big": 1.0, "small": 0.1}, 10)
    cw, mcw, mix = parse_model(fake_service(curve), "mixllm:budget=0.55")[0]
    assert (cw, mcw) == (100.0, 0.0) and mix == pytest.approx(0.5)  # halfway between the two hull points


def test_candidates():
    from mixllm_jax.serve.gateway import candidates

    svc = fake_service()
    np.testing.assert_array_equal(candidates(svc, {}, None), [True, True, True, False])
    np.testing.assert_array_equal(candidates(svc, {"allowed_models": ["big", "mid"], "blocked_models": ["mid"]}, None),
                                  [True, False, False, False])
    np.testing.assert_array_equal(candidates(svc, {"blocked_models": ["big"]}, "small"), [False, True, False, False])
    for body, pinned, needle in [({"allowed_models": ["big", "x", "y"]}, None, r"\['x', 'y'\]"),
                                 ({"blocked_models": ["big", "small", "mid"]}, None, "no candidate"),
                                 ({"allowed_models": [1]}, None, "list of at most"),
                                 ({"allowed_models": ["big"]}, "small", "excluded")]:
        with pytest.raises(ApiError, match=needle) as e:
            candidates(svc, body, pinned)
        assert e.value.status == 400


def test_backend_context_window():
    from mixllm_jax.serve.backends import BackendsFile, parse_backend, request_backend

    b = parse_backend({"base_url": "http://127.0.0.1:9/v1", "context_window": 4096}, "b")
    assert b.context_window == 4096 and b.record()["context_window"] == 4096
    assert "context_window" not in b.public() and "base_url" not in b.public()
    for bad in (0, 1.5, True, 10 ** 9):
        with pytest.raises(ValueError, match="context_window"):
            parse_backend({"base_url": "http://127.0.0.1:9/v1", "context_window": bad}, "b")
    from mixllm_jax.serve.backends import AllowedHost

    allow = BackendsFile(allow_hosts=[AllowedHost("127.0.0.1")])
    assert request_backend({"base_url": "http://127.0.0.1:9/v1", "context_window": 99}, allow).context_window == 99


def test_an_empty_feature_write_leaves_the_log_readable(tmp_path):
    """A batch whose requests were all refused (e.g. no context window fits) writes nothing: a blank
    line made the request log unreadable at the next start."""
    from mixllm_jax.store.journal import Entry, FeatureStore

    fs = FeatureStore(tmp_path, capacity=4)
    fs.put_many([("r1", Entry(np.zeros(3, np.float32), slot=0, generation=0, model="m", prompt_tokens=1, log_tokens=1))])
    fs.put_many([])
    fs.close()
    back = FeatureStore(tmp_path, capacity=4)
    assert back.load() == 1 and back.get("r1").model == "m"


def test_checkpoints_from_before_the_generation_rename_still_restore():
    """The slot generations were saved as "arm_id" before the rename (issue 13): still read."""
    from mixllm_jax.serve.compute import extras_template, fit_generation

    man = {"feedback/params/Dense_0/kernel": {"shape": [5, 8]}, "feedback/params/Dense_2/kernel": {"shape": [8, 4]},
           "journal_seq": {"shape": []}}
    for name in ("arm_id", "generation"):
        like, kind = extras_template({"arrays": {"extras": {**man, name: {"shape": [4]}}}})
        assert kind == "server" and like[name].shape == (4,)
    np.testing.assert_array_equal(fit_generation(np.array([0, 7]), 4), [0, 7, -1, -1])


def test_old_backend_failure_quality_records_are_skipped_on_replay():
    """Journals from before issue 24 hold quality-0 records of backend failures: replayed, they flag
    their request (no later feedback) but teach nothing."""
    from mixllm_jax.serve.intake import Intake
    from mixllm_jax.serve.prometheus import Metrics

    entry = types.SimpleNamespace(applied=0, has_quality=False, has_thumbs=False)
    m = Metrics()
    intake = Intake(types.SimpleNamespace(), features={"r": entry}, journal=None, metrics=m, cluster_mode=False)
    old = {"type": "quality", "rid": "r", "source": "backend_failure", "quality": 0.0, "slot": 0, "generation": 0,
           "log_tokens": 3.0, "x": "AAAA"}
    intake.apply("quality", [old], replay_flags_only=False)  # a live state without arms: applying would fail
    assert entry.has_quality and m.learning.dropped._value.get() == 0

"""The throughput suite on a tiny configuration: well-formed results and reports, not timings."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import peers, report, throughput as T
from test_encoder import encoder_and_routerbench_ready
from mixllm_jax.core.policy import Policy, route_batch

TINY = T.Suite(center=(4, 16, 32), route_B=(1, 32), route_K=(2, 4), route_d=(8, 16), update_B=(32,),
               text_lengths=(16,), text_batch=8, text_train=16, peak_sizes=(64,), peer_updates=2,
               numpy_updates=4, min_time=0.001, repeat=2, budget_s=0.01)


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.mark.parametrize("K,d,B,seed", [(4, 16, 64, 0), (16, 64, 512, 2)])
def test_numpy_reference_picks_the_same_arms_as_route_batch(K, d, B, seed):
    st = T.random_state(K, d, seed=seed)
    x, p = T.queries(B, d, seed=seed + 10)
    pol = Policy(**T.ROUTE_POLICY, in_batch_load=False)
    dec = route_batch(st, jnp.asarray(x), jnp.asarray(p), pol)
    assert float(jnp.abs(dec.penalty).max()) == 0.0  # a fresh state has no load: numpy omits it
    ref = T.numpy_route(np.asarray(st.A_inv), np.asarray(st.B), np.asarray(st.price_in),
                        np.asarray(st.price_out), x, p, T.ROUTE_POLICY["cost_weight"], T.ROUTE_POLICY["alpha"])
    np.testing.assert_array_equal(ref, np.asarray(dec.arm))
    assert len(np.unique(ref)) > 1  # the check is not trivially one arm everywhere


def test_numpy_update_matches_the_arms_update():
    K, d = 4, 8
    st = T.random_state(K, d)
    x, arm, y = T.random_obs(K, d, 12, seed=5)
    A_inv, B = np.array(st.A_inv), np.array(st.B)
    T.numpy_update(A_inv, B, x, arm, y)
    new = T.bandit.update_arms(st, jnp.asarray(x), jnp.asarray(arm), jnp.asarray(y))
    np.testing.assert_allclose(A_inv, np.asarray(new.A_inv), atol=1e-5)
    np.testing.assert_allclose(B, np.asarray(new.B), atol=1e-5)


def test_route_configs_are_the_three_sweeps_once_center_first():
    cfgs = T.route_configs(TINY)
    assert cfgs[0] == TINY.center
    assert len(cfgs) == len(set(cfgs))
    assert set(cfgs) == {(4, 16, 1), (4, 16, 32), (2, 16, 32), (4, 8, 32)}


@pytest.mark.parametrize("peers_on", [False, True])
def test_tiny_suite_is_well_formed(tmp_path, peers_on):
    res = T.run(TINY, peers_on=peers_on, text_on=False, progress=False)
    assert res["device"].startswith(res["jax_backend"]) or ":" in res["device"]
    assert _positive(res["matmul"]["peak_gflops"])
    cfgs = T.route_configs(TINY)
    plain = [r for r in res["route"] if not r["in_batch_load"]]
    assert [(r["K"], r["d"], r["B"]) for r in plain] == cfgs
    assert [(r["K"], r["d"], r["B"]) for r in res["route"] if r["in_batch_load"]] == [TINY.center]
    has_mab = peers_on and peers.find_mabwiser()[0] is not None
    for r in plain:
        for k in ("jax_decisions_per_s", "jax_gflops", "peak_fraction", "numpy_decisions_per_s",
                  "speedup_vs_numpy"):
            assert _positive(r[k]), (k, r)
        assert r["compile_s"] >= 0
        assert r["agree_numpy"] == 1.0
        assert ("speedup_vs_mabwiser" in r) == has_mab
    assert len(res["update"]) == 2 and {r["hot_arm"] for r in res["update"]} == {False, True}
    spread, hot = sorted(res["update"], key=lambda r: r["hot_arm"])
    assert spread["compile_s"] >= 0 and hot["compile_s"] is None  # same shapes: compiled once
    for r in res["update"]:
        assert _positive(r["jax_updates_per_s"]) and _positive(r["speedup_vs_numpy"])
        assert ("speedup_vs_mabwiser" in r) == has_mab
    if has_mab:
        center = next(r for r in plain if (r["K"], r["d"], r["B"]) == TINY.center)
        assert 0.0 <= center["agree_mabwiser"] <= 1.0
    assert res["text"] == [] and res["text_skipped"] == "--no-text"

    tg = {t["target"]: t for t in res["targets"]}
    assert len(tg) == 7  # route, update, peak fraction, text; the static tier's text, HTTP req/s and p50
    for name in ("static tier: text to decision vs sentence-transformers + MABWiser",
                 "static tier: /v1/route requests/s at concurrency 64", "static tier: /v1/route p50 latency at concurrency 1"):
        assert tg[name]["status"] == "not measured" and tg[name]["why"]
    for t in tg.values():
        assert t["status"] in ("met", "missed", "not measured")
        assert (t["measured"] is None) == (t["status"] == "not measured")
    assert tg["route_batch fraction of matmul peak at large B"]["status"] != "not measured"
    if not has_mab:
        assert tg["route_batch vs MABWiser predict"]["status"] == "not measured"
        assert tg["route_batch vs MABWiser predict"]["why"]

    files = report.write(res, tmp_path)
    assert {"results.json", "results.md", "route.png", "update.png"} <= set(files)
    assert json.loads((tmp_path / "results.json").read_text())["device"] == res["device"]
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md and "## Compile time, apart from run time" in md and res["device"] in md
    if not peers_on:
        assert "skipped (--no-peers)" in md
    for f in files:
        if f.endswith(".png"):
            assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_writes_the_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "QUICK", TINY)
    assert T.main(["--quick", "--no-text", "--no-peers", "--no-progress", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| target |" in out and "matmul peak" in out
    assert (tmp_path / "b" / "results.md").exists()


@pytest.mark.slow
@pytest.mark.skipif(not encoder_and_routerbench_ready(), reason="needs the default encoder and RouterBench data")
def test_text_to_decision_tiny(tmp_path):
    from mixllm_jax.text import static_distill
    from test_encoder import tiny_bert_folder

    static = tmp_path / "static"  # a static tier distilled from a tiny random BERT (seconds)
    static_distill.distill(static, str(tiny_bert_folder(tmp_path / "bert")), dims=16, batch_size=4096, progress=False)
    ws = T.Workspace(TINY, peers_on=True, text_on=True, progress=False, static=str(static))
    setup = T.text_setup(ws)
    assert "skipped" not in setup
    assert setup["n_train"] == TINY.text_train and len(setup["texts"]) == TINY.text_batch
    assert setup["static_dims"] == 16
    r = T.bench_text(ws, setup, 16)
    assert r["max_length"] == 16 and r["texts"] == TINY.text_batch
    assert 2 <= r["tokens_per_text"] <= 16
    for k in ("jax_texts_per_s", "encode_texts_per_s", "encode_gflops", "static_texts_per_s",
              "static_encode_texts_per_s", "static_vs_jax"):
        assert _positive(r[k])
    assert 0.0 <= r["static_agree_jax"] <= 1.0
    if "st" in setup and "mab" in setup:
        assert _positive(r["peer_texts_per_s"]) and _positive(r["speedup_vs_peer"])
        assert 0.0 <= r["agree_peer"] <= 1.0
        assert _positive(r["static_speedup_vs_peer"])
    res = {"text": [dict(r, max_length=128)], "peers": ws.peers, "text_setup": {}, "route": [], "update": [],
           "suite": {"center": TINY.center}, "matmul": {"peak_gflops": 1.0}}
    res["targets"] = T.targets(res)
    names = [t["target"] for t in res["targets"]]
    assert "static tier: text to decision vs sentence-transformers + MABWiser" in names
    http = [t for t in res["targets"] if "/v1/route" in t["target"]]
    assert len(http) == 2 and all(t["status"] == "not measured" for t in http)
    assert "| static tier: /v1/route p50 latency at concurrency 1 | <= 10 ms |" in report.targets_table(res)


def test_cluster_lag_quantile_interpolates_within_buckets():
    from benchmarks.cluster import histogram_quantile

    # 10 events: 2 at <= 1 ms, 6 more at <= 3 ms, 2 more at <= 10 ms (cumulative counts)
    b = {0.001: 2, 0.003: 8, 0.01: 10, float("inf"): 10}
    assert histogram_quantile(b, 0.5) == pytest.approx(0.001 + 0.002 * (5 - 2) / 6)
    assert histogram_quantile(b, 0.99) == pytest.approx(0.003 + 0.007 * (9.9 - 8) / 2)
    assert histogram_quantile({0.001: 0, float("inf"): 0}, 0.5) is None

"""Each experiment end to end on a small RouterBench subset with one-hot task features (no encoder)."""

import json

import numpy as np
import pytest

from mixllm_jax.sim import experiments as E
from mixllm_jax.sim import simulate as sim
from mixllm_jax.data import routerbench_dir
from mixllm_jax.sim.experiments import common

RB = routerbench_dir()
pytestmark = pytest.mark.skipif(not (RB / "models.json").exists(), reason=f"RouterBench slice not at {RB}")


@pytest.fixture(scope="module")
def quick():
    return E.load_data(quick=True, quick_rows=(240, 120))


def read(report, name):
    paths = report["paths"]
    for k in ("json", "md", "png"):
        assert paths[k].endswith(f"{name}.{k}")
    data = json.loads(open(paths["json"]).read())
    md = open(paths["md"]).read()
    assert "ASSUMPTIONS" in md and "ASSUMPTIONS" in data["latency_note"]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return data, md


def test_latency_experiment(quick, tmp_path):
    r = E.run_experiment("latency", tmp_path, quick=True, data=quick, rates=(10.0, 60.0), repeat=2, singles=False)
    data, md = read(r, "latency")
    assert [p["rate"] for p in data["per_rate"]] == [10.0, 60.0]
    for pr in data["per_rate"]:
        m = pr["methods"]
        assert {"mixllm", "mixllm_no_penalty", "mixllm_snapshot_herding", "cascade_frontier", "cascade_cheap_to_ref",
                "random"} <= set(m)
        # beta = 0 routing ignores the load: without the deadline it is the unconstrained router
        assert m["mixllm_no_penalty"]["quality_pct_no_deadline"] == pytest.approx(data["unconstrained"]["quality_pct"], abs=1e-6)
        assert m["cascade_frontier"]["mean_calls"] > 1.0
        assert "mixllm_vs_unconstrained_rel_pct" in pr["acceptance"]
    assert "## Acceptance" in md and "| 60 |" in md


def test_full_information_reference_is_a_refit_of_both_parts(quick):
    """refit_arms (the continual experiment's full-information reference) equals training offline
    on both parts at once: same statistics, the same prior chosen by evidence, the same arms."""
    off_i, on_i = common.split_idx(len(quick.train), 0.3, 0)
    off, on = quick.train.select(off_i), quick.train.select(on_i)
    router = common.fit_offline(off, quick.e_train[off_i], quick, progress=False)
    xs = [common.router_features(router, quick.e_train[i]) for i in (off_i, on_i)]
    state = common.refit_arms(router, xs, [off, on])
    both = common.fit_offline(common.concat([off, on]), np.concatenate([quick.e_train[off_i], quick.e_train[on_i]]), quick,
                         progress=False)
    np.testing.assert_allclose(np.asarray(state.A), np.asarray(both.state.A), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(state.B), np.asarray(both.state.B), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(state.noise), np.asarray(both.state.noise), rtol=1e-4)
    assert not np.allclose(np.asarray(state.A), np.asarray(router.state.A))  # the online part counts


def test_continual_experiment(quick, tmp_path):
    r = E.run_experiment("continual", tmp_path, quick=True, data=quick, splits=(0.5, 0.3))
    data, md = read(r, "continual")
    assert [row["split"] for row in data["table"]] == ["50:50", "30:70"]
    for row in data["table"]:
        assert row["none"]["gain_rel_pct"] == 0.0
        for m in ("refined", "binary", "full_information"):
            assert np.isfinite(row[m]["gain_rel_pct"]) and np.isfinite(row[m]["quality_at_cap"])
    for run in data["runs"]:
        assert run["n_offline"] + run["n_online"] == len(quick.train)
        assert run["modes"]["refined"]["stream"]["n"] == run["n_online"]
    acc = data["acceptance"]
    assert acc["shortfall_vs_paper_pct_points"] == pytest.approx(max(0.0, 2.22 - acc["refined_gain_30_70_pct"]))
    assert "30:70" in md and "[+2.22%]" in md
    # exploration: every mode's regret curve against the best fixed policy in hindsight, and arm traces
    for run in data["runs"]:
        for m in ("none", "refined", "binary", "refined_greedy", "refined_thompson"):
            reg = run["modes"][m]["regret"]
            assert reg["n"][-1] == run["n_online"] and reg["final"] == pytest.approx(reg["regret"][-1])
            assert sum(map(sum, run["modes"][m]["arm_trace"])) == run["n_online"]
        assert run["modes"]["refined_greedy"]["mean_propensity"] == 1.0  # deterministic
        assert run["modes"]["binary"]["mean_propensity"] < 1.0  # drawn from the softmax, propensities logged
    assert "exploration_lowers_regret_every_split" in acc and "binary_gain_every_split" in acc
    assert "## Exploration: regret in the stream" in md
    with open(r["paths"]["regret_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_llm_changes_experiment(quick, tmp_path):
    r = E.run_experiment("llm-changes", tmp_path, quick=True, data=quick)
    data, md = read(r, "llm-changes")
    c = data["checks"]
    assert c["no_recompilation"] is True
    assert all(v == 0 for k, v in c["recompiles_after_first_event"].items() if k in ("route_batch", "update_batch", "serve"))
    assert c["nothing_routed_to_removed"] is True and c["removed_share_before_removal"] > 0.0
    assert [e["event"] for e in data["events"]] == ["AddLLM"] * 3 + ["RemoveLLM", "SetPrice"]
    assert sum(c["added_llms_share_after_add"].values()) > 0.0  # the new LLMs got traffic
    assert len(data["phases"]["adaptive"]) == 4


def test_out_of_domain_experiment(quick, tmp_path):
    r = E.run_experiment("out-of-domain", tmp_path, quick=True, data=quick)
    data, md = read(r, "out-of-domain")
    assert [e["task"] for e in data["per_task"]] == ["arc-challenge", "mbpp", "winogrande"]
    modes = {"none", "refined", "binary", "refined_greedy", "refined_thompson"}
    for e in data["per_task"]:
        assert set(e["modes"]) == modes
        assert e["modes"]["none"]["drop_rel_pct"] is not None
        assert all(np.isfinite(e["modes"][m]["regret"]["final"]) for m in modes)
    assert set(data["mean_drop_rel_pct"]) == modes
    red = data["drop_reduction_pct_points"]
    assert red["held_out_refined"] == pytest.approx(data["mean_drop_rel_pct"]["refined"] - data["mean_drop_rel_pct"]["none"])
    assert data["online"]["grow_domains"] is False  # one-hot task features: no head, no domains to grow
    assert "-5.44%" in md and "regret" in md


def test_ope_experiment(quick, tmp_path):
    from mixllm_jax import cli
    from mixllm_jax.offline import ope

    r = E.run_experiment("ope", tmp_path, quick=True, data=quick)
    data, md = read(r, "ope")
    assert len(data["targets"]) == 3 and data["n"] == len(quick.test)
    lp = data["logging_policy"]
    assert 0 < lp["min_propensity"] <= lp["mean_propensity"] < 1  # a stochastic logging policy, logged
    log = ope.read_log(data["log"])
    assert len(log) == len(quick.test) and np.all((log.propensity > 0) & (log.propensity <= 1))
    for t in data["targets"]:
        for k in ("ips", "snips", "dr"):
            e = t["estimates"][k]
            assert e["low"] <= e["value"] <= e["high"] and e["n"] == len(quick.test)
        assert 0 <= t["truth"] <= 1
    # the command line gives the same estimates for the first target (replaying the saved log)
    t0 = data["targets"][0]
    args = cli.build_parser().parse_args(["ope", "--log", data["log"], "--router", data["router"],
                                          "--cost-weight", repr(t0["cost_weight"])])
    cli_out = cli.cmd_ope(args)
    for k in ("ips", "snips", "dr"):
        assert cli_out[k]["value"] == pytest.approx(t0["estimates"][k]["value"], rel=1e-5, abs=1e-9)


def test_unknown_experiment_and_helpers(quick):
    with pytest.raises(ValueError, match="unknown experiment"):
        E.run_experiment("nope", "/tmp/unused", data=quick)
    sub = E.select_models(quick.test, ["claude-v2", "gpt-4-1106-preview"])
    assert sub.models == ["claude-v2", "gpt-4-1106-preview"] and sub.quality.shape == (len(quick.test), 2)
    np.testing.assert_array_equal(sub.cost[:, 1], quick.test.cost[:, 0])
    e_tr, e_te = E.onehot_features(quick.train, quick.test)
    assert e_tr.shape[1] == 3 and (e_tr.sum(1) == 1).all() and (e_te.sum(1) == 1).all()


def test_simulate_main_writes_one_load_report(tmp_path):
    r = E.simulate_main(out_dir=tmp_path, rate=20.0, arrival="poisson", refresh_s=None, quick=True, progress=False)
    data, md = read(r, "simulate")
    assert data["rates"] == [20.0] and data["config"]["arrival"] == "poisson" and data["config"]["refresh_s"] is None
    m = data["per_rate"][0]["methods"]
    assert "gpt-4-1106-preview" in m and m["gpt-4-1106-preview"]["cost_pct"] == pytest.approx(100.0, abs=1e-6)

"""Evaluation: operating points against hand-computed values, the report's schema and files."""

import dataclasses
import json

import numpy as np
import pytest

from mixllm_jax.data import Dataset
from mixllm_jax.offline.evaluate import (calibration, paired_bootstrap, COST_WEIGHTS, Sweep, choose_by_score, evaluate,
                                 points_for, single_llm_methods)
from mixllm_jax.offline.report import compact, format_bootstrap_table, format_table, format_task_table, write_report

# 3 queries, 2 models; model 0 is the reference: total quality 2, total cost 0.06.
Q = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
C = np.array([[0.010, 0.001], [0.020, 0.002], [0.030, 0.003]])


def small_dataset(quality=Q, cost=C, tags=(("a",), ("a",), ("b",))):
    n, m = np.shape(quality)
    return Dataset(query_ids=[str(i) for i in range(n)], prompts=["p"] * n, tags=list(tags),
                   models=[f"m{j}" for j in range(m)], quality=quality, cost=cost,
                   prompt_tokens=np.ones(n), completion_tokens=np.ones((n, m)), split=["test"] * n)


def test_points_for_hand_computed():
    chosen = np.array([[0, 0, 0],   # the reference itself: (100, 100)
                       [1, 1, 1],   # q 2/2 = 100%, c .006/.06 = 10%
                       [0, 1, 1],   # q 3/2 = 150%, c (.010+.002+.003)/.06 = 25%
                       [1, 0, 0]])  # q 1/2 = 50%,  c (.001+.020+.030)/.06 = 85%
    pts = points_for(chosen, Q, C, ref=0, cost_weights=[0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose([p["cost_pct"] for p in pts], [100, 10, 25, 85])
    np.testing.assert_allclose([p["quality_pct"] for p in pts], [100, 100, 150, 50])
    assert [p["cost_weight"] for p in pts] == [0.0, 1.0, 2.0, 3.0]
    # reference = model 1 (quality 2, cost .006): choosing model 0 everywhere is 100% / 1000%
    (p,) = points_for(np.zeros(3, int), Q, C, ref=1)
    assert p["quality_pct"] == pytest.approx(100.0) and p["cost_pct"] == pytest.approx(1000.0)
    assert p["cost_weight"] is None


def test_points_for_other_knob_and_errors():
    (p,) = points_for(np.array([[1, 1, 1]]), Q, C, 0, [0.5], knob="mix_prob")
    assert p["mix_prob"] == 0.5 and p["cost_weight"] is None
    with pytest.raises(ValueError, match="model indices"):
        points_for(np.array([[0, 2, 0]]), Q, C, 0)
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        points_for(np.array([[0, 1]]), Q, C, 0)
    q_nan = Q.copy()
    q_nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        points_for(np.array([[0, 1, 1]]), q_nan, C, 0)
    points_for(np.array([[0, 1, 0]]), q_nan, C, 0)  # the NaN cell is not chosen: fine


def test_choose_by_score_lambda_and_ties():
    q = np.array([[0.9, 0.8, 0.9], [0.5, 0.5, 0.5]])
    c = np.array([[0.02, 0.001, 0.01], [0.003, 0.002, 0.001]])
    ch = choose_by_score(q, c, [0.0, 50.0, 1e4])
    np.testing.assert_array_equal(ch[0], [2, 2])  # best quality, tie to the cheaper
    # lambda 50, query 0: -.1, .75, .4 -> model 1; query 1: .35, .4, .45 -> model 2
    np.testing.assert_array_equal(ch[1], [1, 2])
    np.testing.assert_array_equal(ch[2], [1, 2])  # cheapest
    assert choose_by_score(q, c, 0.0).shape == (2,)
    q_nan = q.copy()
    q_nan[0, 2] = np.nan  # never chosen
    assert choose_by_score(q_nan, c, 0.0)[0] == 0


def test_cost_weights_grid():
    assert COST_WEIGHTS[0] == 0 and np.all(np.diff(COST_WEIGHTS) > 0)
    assert COST_WEIGHTS[1] == pytest.approx(1.0) and COST_WEIGHTS[-1] == pytest.approx(1e5)


def test_evaluate_schema_and_shared_c_max():
    ds = small_dataset()
    methods = {
        "router": Sweep(np.array([[0, 0, 0], [0, 1, 1], [1, 1, 1]]), [0.0, 10.0, 100.0]),
        "fn": lambda lam: np.zeros(3, int) if lam < 1 else np.ones(3, int),  # callable(lambda)
        "mix": Sweep(np.array([[1, 1, 1], [0, 0, 0]]), [0.0, 1.0], "mix_prob"),
        **single_llm_methods(ds.models, 3),
    }
    rep = evaluate(methods, ds, "m0", cost_weights=[0.0, 10.0], budgets=(24.18, 30.0))
    assert rep["reference"] == "m0" and set(rep["methods"]) == {"router", "fn", "mix", "m0", "m1"}
    assert rep["c_max_pct"] == pytest.approx(100.0)
    for name, m in rep["methods"].items():
        assert {"aiq", "points", "kind", "best_quality_at_cost_pct", "per_task"} <= set(m)
        for p in m["points"]:
            assert {"cost_weight", "cost_pct", "quality_pct"} <= set(p)
        assert set(m["per_task"]) == {"a", "b"}
    assert rep["methods"]["m1"]["kind"] == "single" and len(rep["methods"]["m1"]["points"]) == 1
    assert rep["methods"]["fn"]["kind"] == "sweep" and len(rep["methods"]["fn"]["points"]) == 2
    assert rep["methods"]["mix"]["points"][0]["mix_prob"] == 0.0
    # router: (100, 100), (25, 150), (10, 100) -> hull (10, 100), (25, 150), flat to c_max = 100
    # area: 15 * 125 + 75 * 150 = 13125 over 100 -> 131.25
    r = rep["methods"]["router"]
    assert r["aiq"] == pytest.approx(131.25)
    assert r["best_quality_at_cost_pct"] == {"24.18": pytest.approx(100.0), "30": pytest.approx(150.0)}
    assert rep["methods"]["m0"]["aiq"] == pytest.approx(0.0)  # a point at c_max has no area
    assert rep["methods"]["m1"]["aiq"] == pytest.approx(90.0)  # (10, 100), flat over 10..100
    assert rep["methods"]["m0"]["best_quality_at_cost_pct"]["24.18"] is None
    # task a = queries 0, 1: reference totals q 2, c .03; router row [0, 1] -> q 100%, c 40%
    pa = r["per_task"]["a"]["points"]
    assert pa[1]["quality_pct"] == pytest.approx(100.0) and pa[1]["cost_pct"] == pytest.approx(40.0)
    # task b = query 2, where the reference scores 0: no percentages, said so, no crash
    assert r["per_task"]["b"]["aiq"] is None and r["per_task"]["b"]["points"] == []
    assert rep["tasks"]["b"] == {"n_queries": 1, "c_max_pct": None, "note": rep["tasks"]["b"]["note"]}
    tt = format_task_table(rep)
    assert "| task (queries) | router |" in tt and "| b (1) | - / - |" in tt  # router first; task b: no %


def test_evaluate_rejects_unknown_reference_and_bad_shapes():
    ds = small_dataset()
    with pytest.raises(ValueError, match="reference"):
        evaluate({"m0": np.zeros(3, int)}, ds, "gpt-5")
    with pytest.raises(ValueError, match="match neither"):
        evaluate({"x": np.zeros((4, 3), int)}, ds, "m0", cost_weights=[0.0, 1.0])


def test_write_report_files_and_tables(tmp_path):
    rng = np.random.default_rng(0)
    q = (rng.random((40, 3)) < [0.9, 0.6, 0.7]).astype(np.float32)
    c = rng.random((40, 3)) * [1e-2, 1e-4, 1e-3]
    ds = small_dataset(q, c, tags=[("t1",)] * 20 + [("t2",)] * 20)
    methods = {"oracle": Sweep(choose_by_score(q, c, COST_WEIGHTS), list(COST_WEIGHTS)),
               **single_llm_methods(ds.models, 40)}
    rep = evaluate(methods, ds, "m0")
    paths = write_report(rep, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(compact(rep)))
    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    table = format_table(rep)
    assert table in md and format_task_table(rep).splitlines()[0] in md
    lines = table.splitlines()
    assert len([x for x in lines if x.startswith("| ")]) == 2 + 4 and lines[2].startswith("| oracle |")  # best AIQ first
    assert "m0 (ref)" in table and "| t1 (20) |" in format_task_table(rep)
    full = write_report(rep, tmp_path / "full", full=True)
    assert json.loads(full["json"].read_text()) == json.loads(json.dumps(rep))
    assert full["json"].stat().st_size > paths["json"].stat().st_size


def test_single_points_show_no_aiq_and_wide_task_tables_stay_narrow():
    """A single LLM's AIQ is "—" (its quality and cost are shown); 57 tasks make rows, not columns."""
    rng = np.random.default_rng(1)
    n, tasks = 57 * 4, [(f"mmlu-subject-with-a-long-name-{i:02d}",) for i in range(57) for _ in range(4)]
    q = (rng.random((n, 3)) < [0.9, 0.6, 0.7]).astype(np.float32)
    q[::4, 0] = 1.0  # every task: the reference scores > 0
    c = rng.random((n, 3)) * [1e-2, 1e-4, 1e-3] + 1e-6
    ds = small_dataset(q, c, tags=tasks)
    methods = {"oracle": Sweep(choose_by_score(q, c, COST_WEIGHTS), list(COST_WEIGHTS)),
               **single_llm_methods(ds.models, n)}
    rep = evaluate(methods, ds, "m0")
    table = format_table(rep)
    ref_row = next(x for x in table.splitlines() if x.startswith("| m0 (ref) |"))
    assert ref_row.split(" | ")[1] == "—" and "100.00 (100.00)" in ref_row  # no AIQ 0.00; quality (cost)
    assert "0.00" not in ref_row.split(" | ")[1]
    tt = format_task_table(rep)
    assert max(len(x) for x in tt.splitlines()) < 200
    assert sum(x.startswith("| mmlu-subject") for x in tt.splitlines()) == 57
    # report.json: the per-task points stay out unless asked for
    small = len(json.dumps(compact(rep), indent=1))
    assert small < len(json.dumps(rep, indent=1)) / 3
    assert all("points" not in pt for m in compact(rep)["methods"].values() for pt in m["per_task"].values())


def test_calibration_ece_by_hand():
    q_hat = np.array([[0.05, 0.95], [0.15, 0.85], [np.nan, 0.9]])
    quality = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, np.nan]])
    cal = calibration(q_hat, quality, bins=10)
    # bins: 0 -> pred .05 obs 0; 1 -> pred .15 obs 1; 8 -> pred .85 obs 0; 9 -> pred .95 obs 1
    expected = (0.05 + 0.85 + 0.85 + 0.05) / 4
    assert cal["ece"] == pytest.approx(expected)
    assert [b["n"] for b in cal["bins"]] == [1, 1, 1, 1]


def test_paired_bootstrap_by_hand():
    """Method a is the better LLM on every query of two tasks: the difference and its interval are
    positive; a method against itself differs by exactly 0."""
    n = 40
    quality = np.stack([np.r_[np.ones(30), np.zeros(10)], np.r_[np.zeros(30), np.ones(10)] * 0.5], 1)
    cost = np.tile([1.0, 1.0], (n, 1))
    ds = Dataset(query_ids=[str(i) for i in range(n)], prompts=["p"] * n, tags=[("a",)] * 20 + [("b",)] * 20,
                 models=["m0", "m1"], quality=quality, cost=cost, prompt_tokens=np.ones(n),
                 completion_tokens=np.ones((n, 2)), split=["test"] * n)
    a = np.zeros(n, int)
    b = np.ones(n, int)
    out = paired_bootstrap(a, b, ds, "m0", n_boot=200)
    # task a: 20 ones vs 0; task b: 10 ones + 10 zeros vs 10 halves -> (1 - 0) / 2 + (0.5 - 0.25) / 2
    assert out["task_mean_quality"]["diff"] == pytest.approx(100 * (1.0 + 0.25) / 2)
    assert 0 < out["task_mean_quality"]["lo"] <= out["task_mean_quality"]["hi"]
    same = paired_bootstrap(a, a, ds, "m0", n_boot=50)
    assert same["task_mean_quality"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    cheaper = dataclasses.replace(ds, cost=np.tile([1.0, 0.5], (n, 1)))
    assert paired_bootstrap(a, a, cheaper, "m0", n_boot=50)["aiq"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_llms_of_one_price_have_no_aiq(tmp_path):
    """When every LLM costs the same there is no cost-quality curve: AIQ is None in the report, "—"
    in the tables (with the reason), nan in the bootstrap; quality is still compared."""
    n = 40
    quality = np.stack([np.r_[np.ones(30), np.zeros(10)], np.r_[np.zeros(30), np.ones(10)]], 1)
    ds = small_dataset(quality, np.full((n, 2), 1e-3), tags=[("a",)] * 20 + [("b",)] * 20)
    oracle = Sweep(choose_by_score(quality, ds.cost, COST_WEIGHTS), list(COST_WEIGHTS))
    rep = evaluate({"oracle": oracle, **single_llm_methods(ds.models, n)}, ds, "m0")
    assert rep["flat_cost"] and rep["methods"]["oracle"]["aiq"] is None
    assert all(pt["aiq"] is None for pt in rep["methods"]["oracle"]["per_task"].values())
    table = format_table(rep)
    row = next(x for x in table.splitlines() if x.startswith("| oracle |"))
    assert row.split(" | ")[1] == "—" and "every LLM costs the same" in table
    assert "— / " in format_task_table(rep)
    boot = paired_bootstrap(oracle.chosen, np.zeros(n, int), ds, "m0", n_boot=50)
    assert boot["aiq"] == {"diff": None, "lo": None, "hi": None}
    assert boot["task_mean_quality"]["diff"] == pytest.approx(100 * 0.25)
    json.dumps({"report": rep, "bootstrap": boot}, allow_nan=False)  # report.json stays strict JSON
    assert all(p.exists() for p in write_report(rep, tmp_path).values())  # report files and plot
    assert "| x | — | +25.00" in format_bootstrap_table({"x": boot})

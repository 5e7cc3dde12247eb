"""Baseline routers: valid choices, the oracle's dominance, kNN = per-task best on task one-hots,
and all of them on the RouterBench slice."""

import numpy as np
import pytest

from mixllm_jax.core import metrics
from mixllm_jax.offline.baselines import (KNNRouter, MLPRouter, Oracle, PerTaskBest, RandomMix,
                                  RidgeRouter, SingleLLM, one_hot_task_embeddings, run_baselines)
from mixllm_jax.data import Dataset, load_routerbench, routerbench_dir
from mixllm_jax.offline.evaluate import COST_WEIGHTS, evaluate, points_for

RB = routerbench_dir()
needs_rb = pytest.mark.skipif(not (RB / "models.json").exists(), reason=f"RouterBench slice not at {RB}")

TASKS = ("t0", "t1", "t2")
# per task, each model's chance of a correct answer: the best model differs by task
P_TASK = np.array([[0.9, 0.5, 0.4, 0.3],
                   [0.5, 0.95, 0.4, 0.3],
                   [0.6, 0.5, 0.85, 0.3]])
PRICE = np.array([1e-2, 3e-3, 1e-3, 1e-4])  # USD per query, before noise


def synthetic(n, seed):
    """n queries of 3 tasks, 4 models: (E [n, 8] noisy task embeddings, Dataset)."""
    rng = np.random.default_rng(seed)
    task = rng.integers(0, 3, n)
    q = (rng.random((n, 4)) < P_TASK[task]).astype(np.float32)
    c = PRICE * rng.uniform(0.5, 1.5, (n, 4))
    centres = rng.normal(size=(3, 8)) * 3
    E = (centres[task] + rng.normal(size=(n, 8))).astype(np.float32)
    ds = Dataset(query_ids=[str(i) for i in range(n)], prompts=[""] * n,
                 tags=[(TASKS[t],) for t in task], models=["a", "b", "c", "d"], quality=q, cost=c,
                 prompt_tokens=np.ones(n), completion_tokens=np.ones((n, 4)), split=["x"] * n)
    return E, ds


@pytest.fixture(scope="module")
def split():
    return synthetic(600, 0), synthetic(300, 1)


def all_routers(test):
    return [SingleLLM(2), RandomMix(), Oracle(test.quality, test.cost), PerTaskBest(),
            KNNRouter(k=15), MLPRouter(steps=200), RidgeRouter()]


def test_every_baseline_chooses_valid_indices(split):
    (E_tr, tr), (E_te, te) = split
    for r in all_routers(te):
        r.fit(E_tr, tr.quality, tr.cost, tr.tags)
        knob = 0.3 if r.knob == "mix_prob" else 100.0
        ch = r.choose(E_te, knob, te.tags)
        assert ch.shape == (len(te),) and np.issubdtype(ch.dtype, np.integer), type(r).__name__
        assert ch.min() >= 0 and ch.max() < 4, type(r).__name__
        sw = r.sweep(E_te, None if r.knob != "cost_weight" else COST_WEIGHTS, te.tags)
        assert sw.ndim == 2 and sw.shape[1] == len(te) and sw.min() >= 0 and sw.max() < 4


def test_predicting_routers_follow_the_cost_weight(split):
    (E_tr, tr), (E_te, te) = split
    for r in (PerTaskBest(), KNNRouter(), MLPRouter(steps=200), RidgeRouter()):
        r.fit(E_tr, tr.quality, tr.cost, tr.tags)
        pts = points_for(r.sweep(E_te, [0.0, 1e2, 1e6], te.tags), te.quality, te.cost, 0)
        costs = [p["cost_pct"] for p in pts]
        assert costs[0] > costs[1] > costs[2], type(r).__name__
        assert r.choose(E_te, 1e6, te.tags).tolist() == [3] * len(te)  # the cheapest model


def test_oracle_dominates_every_single_llm(split):
    _, (E_te, te) = split
    cws = np.concatenate([[0.0], np.logspace(-1, 6, 300)])
    ch = Oracle(te.quality, te.cost).sweep(E_te, cws)
    q, c = te.quality.astype(np.float64), te.cost.astype(np.float64)
    q_or, c_or = q[np.arange(len(te)), ch].sum(1), c[np.arange(len(te)), ch].sum(1)  # [L]
    q_single, c_single = q.sum(0), c.sum(0)  # [M]
    # exact: the oracle maximises total q - lambda * c over all assignments, singles included
    for lam, qo, co in zip(cws, q_or, c_or):
        assert np.all(qo - lam * co >= q_single - lam * c_single - 1e-9)
    # so its hull reaches at least each single LLM's quality at that LLM's cost
    for qs, cs in zip(q_single, c_single):
        assert metrics.hull_quality_at_cost(c_or, q_or, cs) >= qs
    assert q_or[0] == te.quality.max(1).sum()
    # ties at lambda 0 go to the cheaper model
    both = (te.quality[:, 2] == 1) & (te.quality[:, 3] == 1) & (te.quality[:, :2].sum(1) == 0)
    assert both.any() and np.all(ch[0][both] == 3)


def test_knn_on_one_hot_tasks_recovers_per_task_best(split):
    (_, tr), (_, te) = split
    E_tr, E_te = one_hot_task_embeddings(tr.tags, te.tags)
    knn = KNNRouter(k=10).fit(E_tr, tr.quality, tr.cost, tr.tags)
    ptb = PerTaskBest().fit(E_tr, tr.quality, tr.cost, tr.tags)
    np.testing.assert_allclose(knn.predict(E_te)[0], ptb.predict(E_te, te.tags)[0], atol=1e-9)
    np.testing.assert_array_equal(knn.sweep(E_te, COST_WEIGHTS), ptb.sweep(E_te, COST_WEIGHTS, te.tags))
    task = np.array([TASKS.index(t[0]) for t in te.tags])
    np.testing.assert_array_equal(knn.choose(E_te, 0.0), P_TASK.argmax(1)[task])  # per-task best


def test_mlp_learns_task_means_from_one_hots(split):
    (_, tr), (_, te) = split
    E_tr, E_te = one_hot_task_embeddings(tr.tags, te.tags)
    q_hat, c_hat = MLPRouter().fit(E_tr, tr.quality, tr.cost).predict(E_te)
    q_ptb = PerTaskBest().fit(E_tr, tr.quality, tr.cost, tr.tags).predict(E_te, te.tags)[0]
    assert np.abs(q_hat - q_ptb).max() < 0.03
    np.testing.assert_allclose(c_hat[0], tr.cost.mean(0), rtol=1e-5)


def test_random_mix_endpoints_and_monotone(split):
    (E_tr, tr), (E_te, te) = split
    rm = RandomMix(probs=np.linspace(0, 1, 11), seed=3).fit(E_tr, tr.quality, tr.cost)
    assert rm.cheap == 3 and rm.best == int(np.argmax(tr.quality.mean(0)))
    sw = rm.sweep(E_te)
    assert np.all(sw[0] == rm.cheap) and np.all(sw[-1] == rm.best)
    frac = (sw == rm.best).mean(1)
    assert np.all(np.diff(frac) >= 0) and 0.35 < frac[5] < 0.65
    np.testing.assert_array_equal(rm.sweep(E_te), sw)  # fixed seed


def test_per_task_best_unseen_task_uses_overall_means(split):
    (E_tr, tr), _ = split
    ptb = PerTaskBest().fit(E_tr, tr.quality, tr.cost, tr.tags)
    q_hat, _ = ptb.predict(E_tr[:2], [("new-task",), ("t0",)])
    np.testing.assert_allclose(q_hat[0], tr.quality.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="tags"):
        ptb.predict(E_tr[:2])


@needs_rb
def test_routerbench_all_baselines_one_hot_tasks():
    tr, te = load_routerbench(split="train"), load_routerbench(split="test")
    E_tr, E_te = one_hot_task_embeddings(tr.tags, te.tags)
    rep = evaluate(run_baselines(E_tr, tr, E_te, te), te, "gpt-4-1106-preview")
    aiq = {n: m["aiq"] for n, m in rep["methods"].items()}
    assert set(te.models) <= set(aiq)
    assert max(aiq, key=aiq.get) == "oracle"
    singles = max(aiq[m] for m in te.models)
    for name in ("per_task_best", "knn", "mlp", "ridge"):
        assert aiq[name] > singles and aiq[name] > aiq["random_mix"], name
    ref = rep["methods"]["gpt-4-1106-preview"]["points"][0]
    assert ref["cost_pct"] == pytest.approx(100.0) and ref["quality_pct"] == pytest.approx(100.0)
    assert rep["c_max_pct"] == pytest.approx(100.0)
    # the oracle beats GPT-4's quality at a fraction of its cost
    assert rep["methods"]["oracle"]["best_quality_at_cost_pct"]["24.18"] > 100.0

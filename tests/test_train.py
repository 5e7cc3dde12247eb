"""train_router on a synthetic log: tag-less logs get k-means domains, the ridge is chosen on
cross-fitted validation, the budget is met on the saved curve, and the final arms are the closed-form
fit of the whole log."""

import numpy as np
import pytest

from mixllm_jax.offline import evaluate, train
from mixllm_jax.core import fit, observation
from mixllm_jax.core.config import Budget, HeadConfig, RouterConfig
from mixllm_jax.data import Dataset, ModelSpec

SPECS = [ModelSpec("cheap", 1.0, 1.0), ModelSpec("mid", 5.0, 5.0), ModelSpec("dear", 30.0, 30.0)]  # USD per Mtok


def synthetic(n=300, h=12, seed=0, tags=False):
    """Three clusters of queries; the dear LLM is best everywhere, the cheap one only on cluster 0."""
    rng = np.random.default_rng(seed)
    cl = rng.integers(0, 3, n)
    e = np.eye(h)[cl] * 3 + rng.normal(size=(n, h))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    p = np.stack([np.where(cl == 0, 0.8, 0.2), np.full(n, 0.6), np.full(n, 0.9)], 1)
    quality = (rng.random((n, 3)) < p).astype(np.float32)
    tokens = np.full((n, 3), 100.0, np.float32)
    cost = 200 * np.array([s.price_in for s in SPECS]) + tokens * np.array([s.price_out for s in SPECS])
    ds = Dataset(query_ids=[str(i) for i in range(n)], prompts=[f"q{i}" for i in range(n)],
                 tags=[(f"t{c}",) if tags else () for c in cl], models=[s.name for s in SPECS], quality=quality,
                 cost=cost, prompt_tokens=np.full(n, 200.0), completion_tokens=tokens, split=["train"] * n,
                 specs=SPECS)
    return ds, e.astype(np.float32)


CFG = RouterConfig(head=HeadConfig(hidden=16, features=8, epochs=5, batch_size=64), ridges=(1.0, 100.0),
                   budget=Budget("share", 0.3))


@pytest.fixture(scope="module")
def trained():
    ds, e = synthetic()
    return train.train_router(ds, SPECS, None, CFG, embeddings=e, progress=False), ds, e


def test_tagless_log_gets_kmeans_domains_and_trains(trained):
    router, _, _ = trained
    assert len(router.head.tags) == 20 and all(t.startswith("domain-") for t in router.head.tags)


def test_budget_is_met_on_the_saved_curve(trained):
    router, ds, e = trained
    pol = router.policy
    assert router.curve is not None and 0 <= pol.mix <= 1
    target = 0.3 * router.curve.reference_spend["dear"]
    lo, hi = sorted(router.curve.spend)[0], sorted(router.curve.spend)[-1]
    assert lo < target < hi
    # the mixture's expected spend on the curve is the target
    i = router.curve.cost_weights.index(pol.cost_weight)
    j = router.curve.cost_weights.index(pol.mix_cost_weight)
    spend = (1 - pol.mix) * router.curve.spend[i] + pol.mix * router.curve.spend[j]
    assert spend == pytest.approx(target, rel=1e-6)
    ch = train.policy_choices(router, e, ds, pol)
    assert set(np.unique(ch)) <= {0, 1, 2}


def test_final_arms_are_the_closed_form_fit_of_the_whole_log(trained):
    router, ds, e = trained
    x = np.asarray(router.embed_features(e), np.float64)
    lt = observation.log_tokens(ds.completion_tokens)
    prior = np.asarray(router.state.ridge, np.float64)  # the chosen row of the prior grid (one for every arm)
    assert np.isclose(CFG.ridges, prior[0]).any() and np.all(prior[:e.shape[1]] == prior[0])
    assert all(np.isclose(CFG.domain_precisions, p).any() for p in prior[e.shape[1]:-1])
    assert prior[-1] == np.float32(fit.INTERCEPT_PRECISION)
    for col, name in enumerate(ds.models):
        k = router.registry.slot(name)
        theta = np.linalg.solve(np.diag(prior) + x.T @ x, x.T @ np.stack([ds.quality[:, col], lt[:, col]], 1))
        got = np.asarray(router.state.A_inv[k], np.float64) @ np.asarray(router.state.B[k], np.float64)
        # predictions agree (coefficients along the collinear bias/domain direction are set by the
        # prior alone and carry float32 error that no query sees)
        np.testing.assert_allclose(x @ got, x @ theta, atol=2e-3)


def test_tagged_log_keeps_its_tags_and_domains_option_overrides():
    ds, e = synthetic(tags=True)
    cfg = CFG.replace(budget=Budget("cost_weight", 0.0), folds=0, ridge_selection="evidence")
    assert train.train_router(ds, SPECS, None, cfg, embeddings=e, progress=False).head.tags == ("t0", "t1", "t2")
    r = train.train_router(ds, SPECS, None, cfg.replace(domains=4), embeddings=e, progress=False)
    assert len(r.head.tags) == 4


def test_share_budget_without_calibration_is_a_clear_error():
    ds, e = synthetic(n=40)
    with pytest.raises(ValueError, match="needs cross-fitting"):
        train.train_router(ds, SPECS, None, CFG.replace(folds=0, ridge_selection="evidence"), embeddings=e,
                           progress=False)

"""Budgets: the hull mixture by hand, policies from a curve, the per-query hash, and config parsing."""

import jax.numpy as jnp
import numpy as np
import pytest

from mixllm_jax.core import budget, policy
from mixllm_jax.core.config import Budget, RouterConfig


def _curve():
    # lambda grid ascending; spend falls as lambda grows. (2.0, 0.5) lies under the hull.
    return budget.OperatingCurve(cost_weights=(0.0, 1.0, 10.0, 100.0), spend=(4.0, 2.0, 1.0, 0.5),
                                 quality=(0.9, 0.5, 0.8, 0.4), reference_spend={"big": 4.0, "small": 0.5},
                                 n_queries=10)


def test_mixture_between_hull_vertices_by_hand():
    c = _curve()
    # hull vertices by spend: (0.5, 0.4) @100, (1.0, 0.8) @10, (4.0, 0.9) @0; (2.0, 0.5) is under it
    lo, hi, p = budget.mixture(np.array(c.cost_weights), np.array(c.spend), np.array(c.quality), 2.5)
    assert (lo, hi) == (10.0, 0.0) and p == pytest.approx((2.5 - 1.0) / 3.0)
    lo, hi, p = budget.mixture(np.array(c.cost_weights), np.array(c.spend), np.array(c.quality), 0.75)
    assert (lo, hi) == (100.0, 10.0) and p == pytest.approx(0.5)
    assert budget.mixture(np.array(c.cost_weights), np.array(c.spend), np.array(c.quality), 0.1) == (100.0, 0.0, 0.0)
    assert budget.mixture(np.array(c.cost_weights), np.array(c.spend), np.array(c.quality), 9.0) == (0.0, 0.0, 0.0)


def test_curve_policies_for_each_budget_kind():
    c = _curve()
    p = c.policy(Budget("share", 0.25))  # 25% of the dearest ("big", 4.0) = 1.0 USD: a vertex
    assert p.cost_weight == 100.0 and p.mix_cost_weight == 10.0 and p.mix == pytest.approx(1.0)
    p = c.policy(Budget("usd", 0.75))
    assert p.mix == pytest.approx(0.5)
    p = c.policy(Budget("cost_weight", 3.0))
    assert (p.cost_weight, p.mix) == (3.0, 0.0)
    with pytest.raises(ValueError, match="nope"):
        c.policy(Budget("share", 0.5, "nope"))
    assert budget.OperatingCurve.from_dict(c.to_dict()) == c


def test_curve_score_is_hull_mean_or_best_quality():
    assert _curve().score() > 0.4
    flat = budget.OperatingCurve((0.0, 1.0), (2.0, 2.0), (0.6, 0.7), {"a": 2.0}, 3)
    assert flat.score() == pytest.approx(0.7)


def test_query_uniform_is_deterministic_and_spread(rng):
    x = jnp.asarray(rng.normal(size=(4000, 16)).astype(np.float32))
    u = np.asarray(policy.query_uniform(x))
    assert np.array_equal(u, np.asarray(policy.query_uniform(x)))
    assert u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert hist.min() > 300 and hist.max() < 500  # ~400 each
    share = (u < 0.3).mean()
    assert 0.27 < share < 0.33


def test_mixture_policy_sends_its_share_to_the_second_weight():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2000, 8)).astype(np.float32))
    pol = policy.Policy(cost_weight=1.0, mix_cost_weight=5.0, mix=0.25)
    lam = np.asarray(policy.cost_weights(pol, x))
    assert set(np.unique(lam)) == {1.0, 5.0} and 0.22 < (lam == 5.0).mean() < 0.28


def test_budget_parsing_and_config_round_trip():
    assert Budget.parse("25%") == Budget("share", 0.25)
    assert Budget.parse("0.3", "gpt") == Budget("share", 0.3, "gpt")
    for bad in ("abc", "-5%", "2000%"):
        with pytest.raises(ValueError):
            Budget.parse(bad)
    cfg = RouterConfig(domains=8, budget=Budget("usd", 0.01), ridges=(1.0, 2.0))
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown router config keys"):
        RouterConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="features"):
        RouterConfig(features="nope")

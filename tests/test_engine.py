import numpy as np
import pytest

from mixllm_jax.core import bandit, engine
from mixllm_jax.core.policy import Policy, route_batch
from conftest import make_state, random_obs


def test_batch_buckets_bound_compilations(rng):
    st = make_state(dim=5)  # a dim no other test uses, so the cache count starts clean
    before = route_batch._cache_size()
    for n in range(1, 140, 3):
        x, _, _ = random_obs(rng, n, 5, 3)
        d = engine.route(st, x, np.zeros(n), Policy())
        assert d.arm.shape == (n,) and d.score.shape == (n, 4)
    assert route_batch._cache_size() - before <= 5  # buckets 1, 8, 32, 128, 512


def _bad_route_cases(rng):
    x, _, _ = random_obs(rng, 4, 6, 3)
    nan_x = x.copy()
    nan_x[2, 1] = np.nan
    return [
        (dict(x=nan_x), "x must be finite, got nan at index \\[2, 1\\]"),
        (dict(x=x[:, :5]), "x must have shape \\[B, 6\\]"),
        (dict(x=x[:0], prompt_tokens=np.zeros(0)), "x is an empty batch"),
        (dict(prompt_tokens=np.array([1, 2, -3, 4.0])), "prompt_tokens must be finite and >= 0, got -3"),
        (dict(prompt_tokens=np.zeros(3)), "prompt_tokens must have shape \\(4,\\)"),
        (dict(policy=Policy(cost_weight=float("inf"))), "policy.cost_weight"),
    ], x


def test_route_rejects_bad_input(rng):
    st = make_state()
    cases, x = _bad_route_cases(rng)
    for override, msg in cases:
        args = dict(x=x, prompt_tokens=np.zeros(4), policy=Policy()) | override
        with pytest.raises(ValueError, match=msg):
            engine.route(st, args["x"], args["prompt_tokens"], args["policy"])


def test_route_needs_an_active_arm(rng):
    st = make_state(n_active=0)
    x, _, _ = random_obs(rng, 2, 6, 1)
    with pytest.raises(ValueError, match="no active arm"):
        engine.route(st, x, np.zeros(2), Policy())


def test_update_rejects_bad_input_and_leaves_state_unchanged(rng):
    st = make_state()
    x, a, y = random_obs(rng, 4, 6, 3)
    inf_y = y.copy()
    inf_y[1, 0] = np.inf
    cases = [
        (dict(targets=inf_y), "targets must be finite, got inf at index \\[1, 0\\]"),
        (dict(arm=np.array([0, 1, 3, 0])), "arm 3 \\(index 2\\) is not an active arm"),
        (dict(arm=np.array([0, 1, 9, 0])), "arm must be in \\[0, 4\\), got 9"),
        (dict(arm=np.array([0.0, 1, 1, 0])), "arm must be an integer array"),
        (dict(targets=y[:3]), "targets has 3 rows but x has 4"),
        (dict(weight=np.array([1, -1, 1, 1.0])), "weight must be finite and >= 0, got -1"),
        (dict(x=x[:, :3]), "x must have shape \\[B, 6\\]"),
    ]
    snapshot = {k: np.asarray(getattr(st, k)).copy() for k in ("A", "A_inv", "B", "count")}
    for override, msg in cases:
        args = dict(x=x, arm=a, targets=y, weight=None) | override
        with pytest.raises(ValueError, match=msg):
            engine.update(st, **args)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(np.asarray(getattr(st, k)), v)


def test_update_padding_does_not_change_result(rng):
    st = make_state()
    x, a, y = random_obs(rng, 9, 6, 3)  # padded to bucket 32
    padded = engine.update(st, x, a, y)
    exact = bandit.update_batch(st, x, a, y)
    np.testing.assert_allclose(np.asarray(padded.A_inv), np.asarray(exact.A_inv), atol=1e-6)  # chunk sizes differ
    np.testing.assert_array_equal(np.asarray(padded.count), np.asarray(exact.count))

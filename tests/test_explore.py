"""Exploration: UCB / Thompson / greedy on the same posterior, softmax and epsilon-mixing, propensities."""

import jax
import numpy as np
import pytest

from mixllm_jax.core import bandit, engine, state as S
from mixllm_jax.core.policy import Policy, choice_probs
from conftest import make_state, numpy_ridge, random_obs


def trained(rng, n=300, dim=6, n_arms=3, noise=(0.2, 0.3, 0.5)):
    st = make_state(dim=dim, n_active=n_arms)
    x, a, y = random_obs(rng, n, dim, n_arms)
    st = bandit.update_arms(st, x, a, y)  # the arms alone: numpy's closed-form ridge
    return st.replace(noise=st.noise.at[:n_arms].set(np.asarray(noise, np.float32))), (x, a, y)


def one_query(rng, dim=6, rows=4096):
    q = rng.normal(size=(1, dim)).astype(np.float32)
    q[:, -1] = 1
    return q, np.repeat(q, rows, 0)


def test_thompson_draws_have_the_posterior_mean_and_variance(rng):
    st, (x, a, y) = trained(rng)
    q, qs = one_query(rng)
    pol = Policy(explore="thompson", alpha=1.0, beta=0.0, in_batch_load=False)
    d = engine.route(st, qs, np.zeros(len(qs), np.float32), pol, key=jax.random.PRNGKey(3))
    draws = np.asarray(d.score)[:, :3] - np.asarray(d.quality)[:, :3]  # cost weight 0, no penalty
    noise = np.array([0.2, 0.3, 0.5])
    for k in range(3):
        th, A_inv = numpy_ridge(x, a, y, k, 6)
        sd = noise[k] * np.sqrt(q[0] @ A_inv @ q[0])  # posterior s.d. of x^T theta_k
        np.testing.assert_allclose(np.asarray(d.quality)[0, k], np.clip(q[0] @ th[:, 0], 0, 1), atol=1e-4)
        np.testing.assert_allclose(np.asarray(d.uncertainty)[0, k], sd, rtol=1e-3)
        n = len(qs)
        assert abs(draws[:, k].mean()) < 4 * sd / np.sqrt(n)  # mean: the posterior mean
        assert abs(draws[:, k].var() / sd ** 2 - 1) < 0.1  # variance: the posterior variance (4096 draws)
    # alpha scales the draw's s.d.
    d2 = engine.route(st, qs, np.zeros(len(qs), np.float32), pol.replace(alpha=2.0), key=jax.random.PRNGKey(4))
    ratio = (np.asarray(d2.score) - np.asarray(d2.quality))[:, :3].std(0) / draws.std(0)
    np.testing.assert_allclose(ratio, 2.0, rtol=0.1)


def test_thompson_choice_frequencies_match_propensities(rng):
    st, _ = trained(rng)
    _, qs = one_query(rng)
    pol = Policy(explore="thompson", alpha=60.0, beta=0.0, in_batch_load=False)  # wide: every arm has a chance
    d = engine.route(st, qs, np.zeros(len(qs), np.float32), pol, key=jax.random.PRNGKey(5))
    arm, p = np.asarray(d.arm), np.asarray(d.propensity)
    freq = np.bincount(arm, minlength=4)[:3] / len(arm)
    assert (freq > 0.05).sum() >= 2, freq  # a real mixture
    for k in range(3):
        if (arm == k).any():  # every row is the same query: its propensity is P(arm k)
            assert abs(p[arm == k].mean() - freq[k]) < 0.05
    assert np.all(p > 0) and np.all(p <= 1)


def test_softmax_and_epsilon_propensities_are_exact(rng):
    st, _ = trained(rng)
    _, qs = one_query(rng)
    T, eps = 0.3, 0.2
    pol = Policy(alpha=0.5, beta=0.0, temperature=T, epsilon=eps, in_batch_load=False)
    d = engine.route(st, qs, np.zeros(len(qs), np.float32), pol, key=jax.random.PRNGKey(6))
    score = np.asarray(d.score)[0]
    want = (1 - eps) * np.asarray(choice_probs(score, T)) + eps * np.isfinite(score) / 3
    arm = np.asarray(d.arm)
    np.testing.assert_allclose(np.asarray(d.propensity), want[arm], rtol=1e-5)
    freq = np.bincount(arm, minlength=4) / len(arm)
    np.testing.assert_allclose(freq, want, atol=0.03)  # the draws follow it
    assert freq[3] == 0  # an inactive slot is never drawn, by epsilon either


def test_in_batch_load_propensity_uses_the_penalised_score(rng):
    st, _ = trained(rng)
    _, qs = one_query(rng, rows=64)
    pol = Policy(alpha=0.0, beta=1.0, tau=1.0, temperature=0.2)
    d = engine.route(st, qs, np.full(len(qs), 100.0, np.float32), pol, key=jax.random.PRNGKey(7))
    score, arm = np.asarray(d.score), np.asarray(d.arm)
    want = np.asarray(choice_probs(score, 0.2))[np.arange(len(arm)), arm]
    np.testing.assert_allclose(np.asarray(d.propensity), want, rtol=1e-5)
    assert np.asarray(d.penalty).max() > 0  # the load did build up inside the batch


def test_deterministic_policies_have_propensity_one_and_greedy_ignores_alpha(rng):
    st, _ = trained(rng)
    x = rng.normal(size=(9, 6)).astype(np.float32)
    x[:, -1] = 1
    pt = np.zeros(9, np.float32)
    ucb = engine.route(st, x, pt, Policy(alpha=3.0, beta=0.0))
    greedy = engine.route(st, x, pt, Policy(alpha=3.0, beta=0.0, explore="greedy"))
    np.testing.assert_array_equal(np.asarray(ucb.propensity), 1.0)
    np.testing.assert_array_equal(np.asarray(greedy.propensity), 1.0)
    np.testing.assert_allclose(np.asarray(greedy.score)[:, :3], np.asarray(greedy.quality)[:, :3], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ucb.score)[:, :3] - np.asarray(ucb.quality)[:, :3],
                               3.0 * np.asarray(ucb.uncertainty)[:, :3], atol=1e-5)
    eps = engine.route(st, x, pt, Policy(alpha=0.0, beta=0.0, epsilon=0.3), key=jax.random.PRNGKey(0))
    best = np.asarray(greedy.score)[:, :3].argmax(1)
    arm = np.asarray(eps.arm)
    np.testing.assert_allclose(np.asarray(eps.propensity), np.where(arm == best, 0.7 + 0.1, 0.1), rtol=1e-5)


def test_stochastic_policy_needs_a_key_and_draws_follow_it(rng):
    st, _ = trained(rng)
    _, qs = one_query(rng, rows=32)
    pt = np.zeros(32, np.float32)
    pol = Policy(explore="thompson", alpha=50.0, beta=0.0)
    with pytest.raises(ValueError, match="PRNG key"):
        engine.route(st, qs, pt, pol)
    with pytest.raises(ValueError, match="PRNG key"):
        engine.route(st, qs, pt, Policy(epsilon=0.1))
    with pytest.raises(ValueError, match="epsilon"):
        engine.route(st, qs, pt, Policy(epsilon=1.5), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="explore"):
        Policy(explore="softmax")
    a1 = np.asarray(engine.route(st, qs, pt, pol, key=jax.random.PRNGKey(1)).arm)
    a2 = np.asarray(engine.route(st, qs, pt, pol, key=jax.random.PRNGKey(1)).arm)
    a3 = np.asarray(engine.route(st, qs, pt, pol, key=jax.random.PRNGKey(2)).arm)
    np.testing.assert_array_equal(a1, a2)
    assert (a1 != a3).any()


@pytest.mark.parametrize("explore", ["ucb", "thompson"])
@pytest.mark.parametrize("good", [True, False])
def test_unobserved_arm_is_tried_then_kept_or_dropped(rng, explore, good):
    """Two arms known from many observations (true quality 0.6 and 0.5); a third joins with an
    uninformative prior (predicted 0, prior s.d. of its bias 0.1 * sqrt(10)). Exploring at 3 s.d., it is tried; then kept when it is better
    (0.8) and dropped when it is worse (0.3). Greedy never tries it."""
    dim, true = 4, np.array([0.6, 0.5, 0.8 if good else 0.3])
    st = S.init_state(4, dim, ridge=[1.0, 1.0, 1.0, 0.1])  # the bias barely penalised, as fit.py does
    for k in range(2):
        st = S.add_arm(st, k, price_in=0.0, price_out=0.0)
    x0 = np.hstack([rng.normal(size=(400, dim - 1)) * 0.1, np.ones((400, 1))]).astype(np.float32)
    for k in range(2):
        st = engine.update(st, x0, np.full(400, k, np.int32),
                           np.stack([true[k] + 0.1 * rng.normal(size=400), np.zeros(400)], 1))
    st = st.replace(noise=st.noise.at[:2].set(0.1))
    st = S.add_arm(st, 2, price_in=0.0, price_out=0.0, prior="uninformative")

    def run(policy, batches=30):
        s, chosen, key = st, [], jax.random.PRNGKey(0)
        for b in range(batches):
            x = np.hstack([rng.normal(size=(16, dim - 1)) * 0.1, np.ones((16, 1))]).astype(np.float32)
            key, k = jax.random.split(key)
            d = engine.route(s, x, np.zeros(16, np.float32), policy, key=k)
            arm = np.asarray(d.arm)
            y = true[arm] + 0.1 * rng.normal(size=16)
            s = engine.update(s, x, arm, np.stack([y, np.zeros(16)], 1))
            chosen.append(arm)
        return np.array(chosen)

    greedy = run(Policy(alpha=0.0, beta=0.0, explore="greedy"))
    assert (greedy == 2).sum() == 0  # predicted 0 < 0.6: never tried
    ch = run(Policy(alpha=3.0, beta=0.0, explore=explore))
    assert (ch[:5] == 2).sum() >= 3  # tried early
    late = (ch[-10:] == 2).mean()
    if good:
        assert late > 0.8  # kept
    else:
        assert late < 0.1  # dropped

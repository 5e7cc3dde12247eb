import jax.numpy as jnp
import numpy as np

from mixllm_jax.core import feedback_net


def test_policy_gradient_learns_which_arm_satisfies(rng):
    fs = feedback_net.init_feedback(dim=5, capacity=4)
    active = jnp.array([True, True, True, False])
    x = jnp.asarray(rng.normal(size=(64, 5)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(feedback_net.bonus(fs, x)), 0.0)  # starts neutral
    for _ in range(200):
        arm = jnp.asarray(rng.integers(0, 3, 64))
        reward = (arm == 1).astype(jnp.float32)  # only arm 1 satisfies
        fs = feedback_net.update(fs, x, arm, reward, active)
    b = np.asarray(feedback_net.bonus(fs, x))
    assert (b[:, 1] > b[:, 0]).all() and (b[:, 1] > b[:, 2]).all()
    assert np.abs(b).max() <= 0.1 + 1e-6
    assert float(fs.count) == 200 * 64


def test_kappa_damps_noisy_feedback():
    fs = feedback_net.init_feedback(dim=3, capacity=2)
    calm = fs._replace(reward_var=jnp.asarray(0.0))
    noisy = fs._replace(reward_var=jnp.asarray(0.25))
    assert float(feedback_net.kappa(calm)) == 1.0
    assert float(feedback_net.kappa(noisy)) < 0.2


def test_padding_rows_do_not_train(rng):
    fs = feedback_net.init_feedback(dim=3, capacity=2)
    x = jnp.ones((4, 3))
    out = feedback_net.update(fs, x, jnp.zeros(4, int), jnp.ones(4), jnp.array([True, True]), jnp.zeros(4, bool))
    for a, b in zip(np.asarray(out.params["Dense_2"]["bias"]), np.asarray(fs.params["Dense_2"]["bias"])):
        assert a == b
    assert float(out.count) == 0 and float(out.reward_mean) == float(fs.reward_mean)


def test_on_policy_softmax_learns_against_the_base_score(rng):
    """Decisions drawn from softmax((s + f) / T) where the base score s prefers arm 0 but only arm 2
    satisfies: REINFORCE on that policy, with the logged propensities, moves f towards arm 2."""
    import jax

    from mixllm_jax.core.policy import choice_probs

    fs = feedback_net.init_feedback(dim=5, capacity=4)
    active = jnp.array([True, True, True, False])
    x = jnp.asarray(rng.normal(size=(64, 5)).astype(np.float32))
    base = jnp.where(active, jnp.array([0.05, 0.0, 0.0, 0.0]), -jnp.inf) * jnp.ones((64, 1))
    T = 0.05
    key = jax.random.PRNGKey(0)
    first = last = None
    for step in range(150):
        key, k = jax.random.split(key)
        probs = choice_probs(base + feedback_net.bonus(fs, x), T)
        arm = jax.random.categorical(k, jnp.log(probs), axis=1)
        prop = jnp.take_along_axis(probs, arm[:, None], 1)[:, 0]
        reward = (arm == 2).astype(jnp.float32)
        first = float(reward.mean()) if first is None else first
        last = float(reward.mean())
        fs = feedback_net.update(fs, x, arm, reward, active, score=base, propensity=prop, temperature=T)
    b = np.asarray(feedback_net.bonus(fs, x))
    assert (b[:, 2] > b[:, 0]).all()
    assert last > first + 0.3  # the stochastic policy now mostly draws the satisfying arm


def test_importance_ratio_weights_each_decision(rng):
    """propensity = pi_current: the same step as on-policy (ratio 1); a huge propensity: ratio ~0,
    no step at all."""
    fs = feedback_net.init_feedback(dim=3, capacity=3)
    active = jnp.array([True, True, True])
    x = jnp.asarray(rng.normal(size=(8, 3)).astype(np.float32))
    score = jnp.asarray(rng.normal(size=(8, 3)).astype(np.float32))
    arm = jnp.asarray(rng.integers(0, 3, 8))
    reward = jnp.asarray((rng.random(8) < 0.5).astype(np.float32))
    pi = jax_softmax = np.exp(np.asarray(score) / 0.5)
    pi = pi / pi.sum(1, keepdims=True)  # the network starts at f = 0
    p_cur = jnp.asarray(pi[np.arange(8), np.asarray(arm)])
    on = feedback_net.update(fs, x, arm, reward, active, score=score, temperature=0.5)
    same = feedback_net.update(fs, x, arm, reward, active, score=score, propensity=p_cur, temperature=0.5)
    none = feedback_net.update(fs, x, arm, reward, active, score=score, propensity=jnp.full(8, 1e30), temperature=0.5)
    k = lambda f: np.asarray(f.params["Dense_2"]["kernel"])  # noqa: E731
    np.testing.assert_allclose(k(same), k(on), atol=1e-7)
    np.testing.assert_allclose(k(none), k(fs), atol=1e-9)
    assert np.abs(k(on) - k(fs)).max() > 1e-5
    del jax_softmax

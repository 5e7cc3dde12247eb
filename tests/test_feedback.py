import jax.numpy as jnp
import numpy as np

from mixllm_jax import feedback


def test_policy_gradient_learns_which_arm_satisfies(rng):
    fs = feedback.init_feedback(dim=5, capacity=4)
    active = jnp.array([True, True, True, False])
    x = jnp.asarray(rng.normal(size=(64, 5)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(feedback.bonus(fs, x)), 0.0)  # starts neutral
    for _ in range(200):
        arm = jnp.asarray(rng.integers(0, 3, 64))
        reward = (arm == 1).astype(jnp.float32)  # only arm 1 satisfies
        fs = feedback.update(fs, x, arm, reward, active)
    b = np.asarray(feedback.bonus(fs, x))
    assert (b[:, 1] > b[:, 0]).all() and (b[:, 1] > b[:, 2]).all()
    assert np.abs(b).max() <= 0.1 + 1e-6
    assert float(fs.count) == 200 * 64


def test_kappa_damps_noisy_feedback():
    fs = feedback.init_feedback(dim=3, capacity=2)
    calm = fs._replace(reward_var=jnp.asarray(0.0))
    noisy = fs._replace(reward_var=jnp.asarray(0.25))
    assert float(feedback.kappa(calm)) == 1.0
    assert float(feedback.kappa(noisy)) < 0.2


def test_padding_rows_do_not_train(rng):
    fs = feedback.init_feedback(dim=3, capacity=2)
    x = jnp.ones((4, 3))
    out = feedback.update(fs, x, jnp.zeros(4, int), jnp.ones(4), jnp.array([True, True]), jnp.zeros(4, bool))
    for a, b in zip(np.asarray(out.params["Dense_2"]["bias"]), np.asarray(fs.params["Dense_2"]["bias"])):
        assert a == b
    assert float(out.count) == 0 and float(out.reward_mean) == float(fs.reward_mean)

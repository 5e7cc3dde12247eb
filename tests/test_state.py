import jax.numpy as jnp
import numpy as np
import pytest

from mixllm_jax.core import bandit, engine, state as S
from mixllm_jax.core.policy import Policy, route_batch
from conftest import make_state, random_obs


def test_add_remove_reuse_without_recompiling(rng):
    st = make_state(capacity=8, n_active=3)
    x, a, y = random_obs(rng, 32, 6, 3)
    pol = Policy()
    engine.route(st, x, np.zeros(32), pol)
    st = engine.update(st, x, a, y)
    n_route, n_update = route_batch._cache_size(), bandit.update_batch._cache_size()
    st = S.add_arm(st, 3, price_in=1e-6, price_out=1e-6)
    st = S.remove_arm(st, 0)
    st = S.add_arm(st, 0, price_in=5e-6, price_out=5e-6)  # slot reuse
    d = engine.route(st, x, np.zeros(32), pol)
    st = engine.update(st, x, np.asarray(d.arm), y)
    assert route_batch._cache_size() == n_route
    assert bandit.update_batch._cache_size() == n_update
    assert st.A.shape == (8, 6, 6)


def test_reused_slot_starts_fresh(rng):
    st = make_state()
    x, a, y = random_obs(rng, 100, 6, 3)
    st = engine.update(st, x, a, y)
    st = S.add_arm(S.remove_arm(st, 1), 1, price_in=0.0, price_out=0.0)
    assert float(st.count[1]) == 0
    np.testing.assert_allclose(np.asarray(st.A_inv[1]), np.eye(6))
    np.testing.assert_allclose(np.asarray(st.B[1]), 0.0)


def test_registry_grows_by_doubling():
    st, reg = S.init_state(2, 4), S.ArmRegistry(2)
    for i in range(3):
        st, reg = S.add_llm(st, reg, f"m{i}", price_in=0.0, price_out=0.0)
    assert st.capacity == 4 and reg.capacity == 4
    assert reg.names == ["m0", "m1", "m2"] and bool(st.active[2]) and not bool(st.active[3])
    st, reg2 = S.remove_llm(st, reg, "m1")
    assert "m1" in reg.slots and "m1" not in reg2.slots  # input registry unchanged
    st, reg3 = S.add_llm(st, reg2, "m3", price_in=0.0, price_out=0.0)
    assert reg3.slot("m3") == 1  # the freed slot is reused


def test_duplicate_name_rejected():
    st, reg = S.add_llm(S.init_state(2, 4), S.ArmRegistry(2), "a", price_in=0.0, price_out=0.0)
    with pytest.raises(ValueError, match="'a' is already registered"):
        S.add_llm(st, reg, "a", price_in=0.0, price_out=0.0)


def test_priors(rng):
    st = make_state(capacity=6)
    x, a, y = random_obs(rng, 300, 6, 3)
    st = engine.update(st, x[:150], a[:150], y[:150])  # the arms' first observations (count 0: no shared step)
    st = engine.update(st, x[150:], a[150:], y[150:])  # arms with evidence teach the shared component too
    q = rng.normal(size=(64, 6)).astype(np.float32)
    q[:, -1] = 1
    greedy = Policy(alpha=0.0, beta=0.0)
    shared = q @ np.asarray(bandit.shared_theta(st))[:, 0]  # every arm's predictions hold the shared component's
    assert np.abs(shared).max() > 1e-3

    def linear(state):  # the unclipped linear predictions of quality (the decision shows them clipped to [0, 1])
        d = engine.route(state, q, np.zeros(64), greedy)
        raw = np.asarray(bandit.predict(state, q)[0])[..., 0]
        np.testing.assert_allclose(np.asarray(d.quality), np.clip(raw, 0.0, 1.0), atol=1e-6)
        return raw, d

    cold = S.add_arm(st, 3, price_in=0.0, price_out=0.0)  # uninformative: its own part predicts 0
    raw, d = linear(cold)
    np.testing.assert_allclose(raw[:, 3], shared, atol=1e-5)
    assert (np.asarray(d.uncertainty)[:, 3] > np.asarray(d.uncertainty)[:, :3].max(1)).all()  # explored first
    raw, _ = linear(S.add_arm(st, 3, price_in=0.0, price_out=0.0, prior="mean"))
    np.testing.assert_allclose(raw[:, 3], raw[:, :3].mean(1), atol=1e-4)
    raw, _ = linear(S.add_arm(st, 3, price_in=0.0, price_out=0.0, prior=0.42))
    np.testing.assert_allclose(raw[:, 3], 0.42 + shared, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(price_in=-1.0, price_out=0.0), "price_in"),
    (dict(price_in=0.0, price_out=float("nan")), "price_out"),
    (dict(price_in=0.0, price_out=0.0, tokens_per_s=0.0), "tokens_per_s"),
    (dict(price_in=0.0, price_out=0.0, max_concurrency=999), "max_concurrency"),
    (dict(price_in=0.0, price_out=0.0, prior="bogus"), "prior"),
])
def test_add_arm_rejects_bad_values(kwargs, field):
    st = make_state()
    with pytest.raises(ValueError, match=field):
        S.add_arm(st, 3, **kwargs)
    assert not bool(st.active[3])


def test_slot_errors():
    st = make_state()
    with pytest.raises(ValueError, match="already active"):
        S.add_arm(st, 0, price_in=0.0, price_out=0.0)
    with pytest.raises(ValueError, match="no active LLM"):
        S.remove_arm(st, 3)
    with pytest.raises(ValueError, match="slot must be"):
        S.remove_arm(st, 17)

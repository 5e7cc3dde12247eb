import jax.numpy as jnp
import numpy as np

from mixllm_jax import bandit, engine
from conftest import make_state, numpy_ridge, random_obs


def test_matches_numpy_closed_form_over_10k_updates(rng):
    dim, n_arms = 8, 4
    st = make_state(capacity=6, dim=dim, n_active=n_arms)
    xs, arms, ys = [], [], []
    sizes = [1, 7, 300, 64, 2000, 5, 4000, 1, 3623]  # 10,001 updates, uneven batches
    for n in sizes:
        x, a, y = random_obs(rng, n, dim, n_arms)
        x[:, :-1] *= 0.5
        st = engine.update(st, x, a, y)
        xs.append(x), arms.append(a), ys.append(y)
    x, a, y = map(np.concatenate, (xs, arms, ys))
    assert len(x) >= 10_000
    th = np.asarray(bandit.theta(st))
    for k in range(n_arms):
        ref_th, ref_inv = numpy_ridge(x, a, y, k, dim)
        np.testing.assert_allclose(th[k], ref_th, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(np.asarray(st.A_inv[k]), ref_inv, atol=1e-6, rtol=1e-3)
        assert float(st.count[k]) == (a == k).sum()
    # symmetric positive definite, small drift
    A_inv = np.asarray(st.A_inv)
    np.testing.assert_array_equal(A_inv, np.swapaxes(A_inv, 1, 2))
    assert np.linalg.eigvalsh(A_inv[:n_arms]).min() > 0
    assert float(bandit.drift(st)[:n_arms].max()) < 1e-3
    # maintenance refreshes drifting arms from the precision matrix, bringing theta closer to numpy
    fixed, dr = bandit.maintain(st, 1e-6)
    assert float(dr.max()) > 1e-6 and float(bandit.drift(fixed).max()) < float(dr.max())
    for k in range(n_arms):
        ref_th, _ = numpy_ridge(x, a, y, k, dim)
        err_before = np.abs(th[k] - ref_th).max()
        assert np.abs(np.asarray(bandit.theta(fixed))[k] - ref_th).max() <= err_before + 1e-6


def test_batch_equals_one_at_a_time(rng):
    st0 = make_state()
    x, a, y = random_obs(rng, 50, 6, 3)
    a[:20] = 1  # many observations of one arm in one batch
    batch = bandit.update_batch(st0, jnp.asarray(x), jnp.asarray(a), jnp.asarray(y))
    seq = st0
    for i in range(len(x)):
        seq = bandit.update_batch(seq, jnp.asarray(x[i:i + 1]), jnp.asarray(a[i:i + 1]), jnp.asarray(y[i:i + 1]))
    for f in ("A", "A_inv", "B", "count"):
        np.testing.assert_allclose(np.asarray(getattr(batch, f)), np.asarray(getattr(seq, f)), atol=2e-6, rtol=1e-5)


def test_weights_equal_repeated_observations(rng):
    st0 = make_state()
    x, a, y = random_obs(rng, 10, 6, 3)
    w = rng.integers(0, 3, 10).astype(np.float32)  # 0, 1 or 2 copies
    weighted = engine.update(st0, x, a, y, weight=w)
    rep = np.repeat(np.arange(10), w.astype(int))
    repeated = engine.update(st0, x[rep], a[rep], y[rep])
    np.testing.assert_allclose(np.asarray(bandit.theta(weighted)), np.asarray(bandit.theta(repeated)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(weighted.A_inv), np.asarray(repeated.A_inv), atol=1e-6)
    for k in range(3):
        ref, _ = numpy_ridge(x, a, y, k, 6, w=w)
        np.testing.assert_allclose(np.asarray(bandit.theta(weighted))[k], ref, atol=1e-4)


def test_refresh_repairs_drift(rng):
    st = make_state()
    x, a, y = random_obs(rng, 200, 6, 3)
    st = engine.update(st, x, a, y)
    corrupted = st.replace(A_inv=st.A_inv.at[1].add(1e-2))
    assert float(bandit.drift(corrupted)[1]) > 1e-3
    fixed, dr = bandit.maintain(corrupted, 1e-3)
    assert float(dr[1]) > 1e-3 and float(bandit.drift(fixed)[1]) < 1e-4
    np.testing.assert_array_equal(np.asarray(fixed.A_inv[0]), np.asarray(st.A_inv[0]))  # untouched arm


def test_merge_of_replicas_is_exact(rng):
    base = make_state()
    x, a, y = random_obs(rng, 120, 6, 3)
    r1 = engine.update(base, x[:60], a[:60], y[:60])
    r2 = engine.update(base, x[60:], a[60:], y[60:])
    merged = bandit.merge(base, r1, r2)
    for k in range(3):
        ref, _ = numpy_ridge(x, a, y, k, 6)
        np.testing.assert_allclose(np.asarray(bandit.theta(merged))[k], ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged.count), np.bincount(a, minlength=4))

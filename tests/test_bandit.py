import jax.numpy as jnp
import numpy as np

from mixllm_jax.core import bandit, engine
from conftest import make_state, numpy_ridge, random_obs


def test_matches_numpy_closed_form_over_10k_updates(rng):
    dim, n_arms = 8, 4
    st = make_state(capacity=6, dim=dim, n_active=n_arms)
    xs, arms, ys = [], [], []
    sizes = [1, 7, 300, 64, 2000, 5, 4000, 1, 3623]  # 10,001 updates, uneven batches
    for n in sizes:
        x, a, y = random_obs(rng, n, dim, n_arms)
        x[:, :-1] *= 0.5
        st = bandit.update_arms(st, x, a, y)
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
    fixed, dr = bandit.maintain(st, 0.0)  # tol 0: every inverse is recomputed from its precision matrix
    assert dr.shape == (st.capacity + 1,) and float(bandit.drift(fixed).max()) < 1e-5
    for k in range(n_arms):
        ref_th, _ = numpy_ridge(x, a, y, k, dim)
        err_before = np.abs(th[k] - ref_th).max()
        assert np.abs(np.asarray(bandit.theta(fixed))[k] - ref_th).max() <= err_before + 1e-6


def test_batch_equals_one_at_a_time(rng):
    st0 = make_state()
    x, a, y = random_obs(rng, 50, 6, 3)
    a[:20] = 1  # many observations of one arm in one batch
    batch = bandit.update_arms(st0, jnp.asarray(x), jnp.asarray(a), jnp.asarray(y))
    seq = st0
    for i in range(len(x)):
        seq = bandit.update_arms(seq, jnp.asarray(x[i:i + 1]), jnp.asarray(a[i:i + 1]), jnp.asarray(y[i:i + 1]))
    for f in ("A", "A_inv", "B", "count"):
        np.testing.assert_allclose(np.asarray(getattr(batch, f)), np.asarray(getattr(seq, f)), atol=2e-6, rtol=1e-5)


def test_weights_equal_repeated_observations(rng):
    st0 = make_state()
    x, a, y = random_obs(rng, 10, 6, 3)
    w = rng.integers(0, 3, 10).astype(np.float32)  # 0, 1 or 2 copies
    weighted = bandit.update_arms(st0, x, a, y, w)
    rep = np.repeat(np.arange(10), w.astype(int))
    repeated = bandit.update_arms(st0, x[rep], a[rep], y[rep])
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
    r1 = bandit.update_arms(base, x[:60], a[:60], y[:60])
    r2 = bandit.update_arms(base, x[60:], a[60:], y[60:])
    merged = bandit.merge(base, r1, r2)
    for k in range(3):
        ref, _ = numpy_ridge(x, a, y, k, 6)
        np.testing.assert_allclose(np.asarray(bandit.theta(merged))[k], ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged.count), np.bincount(a, minlength=4))
    # with the shared component (update_batch): its deltas are summed too, its inverse recomputed
    s1, s2 = engine.update(base, x[:60], a[:60], y[:60]), engine.update(base, x[60:], a[60:], y[60:])
    merged = bandit.merge(base, s1, s2)
    for f in ("shared_A", "shared_B"):
        want = np.asarray(getattr(s1, f)) + np.asarray(getattr(s2, f)) - np.asarray(getattr(base, f))
        np.testing.assert_allclose(np.asarray(getattr(merged, f)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(merged.shared_A_inv), np.linalg.inv(np.asarray(merged.shared_A)), atol=1e-5)


def numpy_split(st, x, arm, y, w):
    """The shared component's split (bandit.split), by hand in float64: (arm targets [B, T], the
    shared component's A [d, d] and B [d, T] after the batch)."""
    A_inv, B = np.asarray(st.A_inv, np.float64), np.asarray(st.B, np.float64)
    S_A, S_B = np.asarray(st.shared_A, np.float64), np.asarray(st.shared_B, np.float64)
    S_inv = np.linalg.inv(S_A)
    phi = S_inv @ S_B
    y_k, y_s = np.zeros_like(y, np.float64), np.zeros_like(y, np.float64)
    rho = np.minimum(np.asarray(st.count, np.float64)[arm] / bandit.SHARED_MIN_COUNT, 1.0)
    for i in range(len(x)):
        th = A_inv[arm[i]] @ B[arm[i]]
        u_k, u_s = x[i] @ A_inv[arm[i]] @ x[i], rho[i] * (x[i] @ S_inv @ x[i])
        r = y[i] - x[i] @ th - x[i] @ phi
        y_k[i] = x[i] @ th + r * (1 + u_k) / (1 + u_k + u_s)
        y_s[i] = x[i] @ phi + r * (1 + u_s) / (1 + u_k + u_s)
    xw = x * (w * rho)[:, None]
    return y_k, S_A + xw.T @ x, S_B + xw.T @ y_s


def test_split_matches_the_formula_by_hand(rng):
    st = bandit.update_arms(make_state(), *random_obs(rng, 80, 6, 3))
    st = engine.update(st, *random_obs(rng, 40, 6, 3))  # a shared component that is not at its prior
    st = st.replace(count=st.count.at[2].set(5.0))  # an arm that has seen little: rho = 1/4
    x, a, y = random_obs(rng, 150, 6, 3)  # more rows than one Woodbury chunk (64)
    w = rng.integers(0, 3, 150).astype(np.float32)
    new, y_k = bandit.split(st, jnp.asarray(x), jnp.asarray(a), jnp.asarray(y), jnp.asarray(w))
    ref_y, ref_A, ref_B = numpy_split(st, x.astype(np.float64), a, y.astype(np.float64), w)
    np.testing.assert_allclose(np.asarray(y_k)[w > 0], ref_y[w > 0], atol=2e-4)  # weight-0 rows: never applied
    np.testing.assert_allclose(np.asarray(new.shared_A), ref_A, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(new.shared_B), ref_B, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(np.asarray(new.shared_A_inv), np.linalg.inv(ref_A), atol=1e-5)
    # update_batch is the split, then the arms' ridge steps on the arms' targets
    both = bandit.update_batch(st, jnp.asarray(x), jnp.asarray(a), jnp.asarray(y), jnp.asarray(w))
    arms = bandit.update_arms(new, jnp.asarray(x), jnp.asarray(a), y_k, jnp.asarray(w))
    for f in ("A", "A_inv", "B", "count", "shared_A", "shared_B"):
        np.testing.assert_allclose(np.asarray(getattr(both, f)), np.asarray(getattr(arms, f)), atol=1e-5)


def test_a_shift_common_to_every_arm_is_not_charged_to_the_observed_one(rng):
    """Offline, three arms learnt their qualities; online, every arm is 0.3 worse (an unseen task
    harder for all) and only arm 0 is observed. The shared component carries the shift to the
    unobserved arms, so the arms' ranking stays; arm updates alone would demote arm 0."""
    dim = 6
    true = rng.normal(size=(3, dim)).astype(np.float32) * 0.3
    x, a, _ = random_obs(rng, 150, dim, 3)
    y = np.stack([np.einsum("bi,bi->b", x, true[a]), np.full(len(x), 4.0)], 1).astype(np.float32)
    st = bandit.update_arms(make_state(dim=dim), x, a, y)
    xo, _, _ = random_obs(rng, 2000, dim, 3)
    ao = np.zeros(2000, np.int32)
    yo = np.stack([xo @ true[0] - 0.3, np.full(2000, 4.0)], 1).astype(np.float32)
    q = rng.normal(size=(256, dim)).astype(np.float32)
    q[:, -1] = 1
    before = np.asarray(bandit.predict(st, q)[0])[:, :3, 0]
    shared = np.asarray(bandit.predict(engine.update(st, xo, ao, yo), q)[0])[:, :3, 0]
    alone = np.asarray(bandit.predict(bandit.update_arms(st, xo, ao, yo), q)[0])[:, :3, 0]
    gap = lambda p: (p[:, 0] - p[:, 1]).mean()  # noqa: E731
    assert abs(gap(alone) - gap(before) + 0.3) < 0.05  # arm 0 alone takes the whole shift
    assert abs(gap(shared) - gap(before)) < 0.1  # the ranking stays
    assert (shared[:, 1] - before[:, 1]).mean() < -0.2  # the unobserved arm moved down too
    np.testing.assert_allclose(shared[:, 0].mean(), (q @ true[0]).mean() - 0.3, atol=0.05)  # arm 0 is right


def test_one_observation_of_a_new_arm_barely_moves_the_others(rng):
    """Issue 24: an LLM added online knows nothing; one observation of it (quality 1.0) moves the
    other arms' predictions through the shared component by at most 0.1 (with the plain split,
    which charges it half the surprise, by about 0.5), and its own prediction towards 1."""
    from mixllm_jax.core.state import add_arm

    from mixllm_jax.core.fit import INTERCEPT_PRECISION

    dim = 6
    x, a, y = random_obs(rng, 600, dim, 3)
    y[:, 0] = rng.uniform(0.3, 0.7, len(y))
    ridge = np.r_[np.ones(dim - 1), INTERCEPT_PRECISION].astype(np.float32)  # a free bias, as fitted routers have
    st = bandit.update_arms(make_state(capacity=4, dim=dim, ridge=ridge), x, a, y)  # the shared component at its prior
    q = rng.normal(size=(256, dim)).astype(np.float32)
    q[:, -1] = 1
    before = np.asarray(bandit.predict(st, q)[0])[:, :3, 0]
    for prior in ("uninformative", "mean"):
        new = add_arm(st, 3, price_in=1e-6, price_out=1e-6, prior=prior)
        one = (jnp.asarray(q[:1]), jnp.asarray([3]), jnp.asarray([[1.0, 4.0]], jnp.float32), jnp.ones(1))
        after = bandit.update_batch(new, *one)
        moved = np.abs(np.asarray(bandit.predict(after, q)[0])[:, :3, 0] - before)
        assert moved.max() < 0.1, (prior, moved.max())
        own = [np.asarray(bandit.predict(s, q[:1])[0])[0, 3, 0] for s in (new, after)]
        assert own[0] < own[1] <= 1.0 + 1e-5, (prior, own)
        plain = bandit.update_batch(new.replace(count=new.count.at[3].set(bandit.SHARED_MIN_COUNT)), *one)
        assert np.abs(np.asarray(bandit.predict(plain, q)[0])[:, :3, 0] - before).max() > 0.1  # the test can fail

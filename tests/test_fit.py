"""Offline arm fit: exact against numpy closed-form ridge with a per-feature prior; evidence picks
the ridge the data support; intercepts are not shrunk."""

import numpy as np

from mixllm_jax.core import fit
from mixllm_jax.core.state import init_state


def _data(rng, n=400, d=6, m=3, signal=1.0):
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, -1] = 1.0
    w = rng.normal(size=(m, d)) * signal
    w[:, -1] = 0.7  # large intercept
    q = (x @ w.T + 0.1 * rng.normal(size=(n, m))).astype(np.float32)
    q[rng.random((n, m)) < 0.1] = np.nan  # unobserved outcomes
    lt = (np.abs(x @ w.T) + 3.0).astype(np.float32)
    return x, q, lt


def test_fit_state_matches_numpy_closed_form(rng):
    x, q, lt = _data(rng)
    pen = np.arange(6) < 5
    st, chosen = fit.fit_state(init_state(4, 6), [2, 0, 1], x, q, lt, fit.prior_grid(pen, [3.0]))
    assert np.all(chosen[:, :5] == 3.0) and np.all(chosen[:, 5] == fit.INTERCEPT_PRECISION)
    for col, slot in enumerate([2, 0, 1]):
        ok = np.isfinite(q[:, col])
        X = x[ok].astype(np.float64)
        prior = np.where(pen, 3.0, fit.INTERCEPT_PRECISION)
        A = np.diag(prior) + X.T @ X
        theta = np.linalg.solve(A, X.T @ np.stack([q[ok, col], lt[ok, col]], 1))
        got = np.asarray(st.A_inv[slot], np.float64) @ np.asarray(st.B[slot], np.float64)
        np.testing.assert_allclose(got, theta, atol=2e-4)
        np.testing.assert_allclose(np.asarray(st.A[slot]), A, rtol=1e-4, atol=1e-3)
        assert float(st.count[slot]) == ok.sum()
        resid = q[ok, col] - X @ theta[:, 0]
        s2 = (resid @ resid + theta[:, 0] @ (prior * theta[:, 0])) / ok.sum()
        np.testing.assert_allclose(float(st.noise[slot]), np.sqrt(s2), rtol=1e-3)
    assert float(st.count[3]) == 0  # the free slot is untouched


def test_intercept_is_not_shrunk(rng):
    """With a huge ridge the slopes vanish but the intercept stays the arm's mean quality."""
    x, q, lt = _data(rng)
    st, _ = fit.fit_state(init_state(4, 6), [0, 1, 2], x, q, lt, fit.prior_grid(np.arange(6) < 5, [1e6]))
    theta = np.einsum("kij,kjt->kit", np.asarray(st.A_inv), np.asarray(st.B))
    for col in range(3):
        assert abs(theta[col, -1, 0] - np.nanmean(q[:, col])) < 0.02
        assert np.abs(theta[col, :5, 0]).max() < 1e-2


def test_evidence_prefers_small_ridge_with_signal_and_large_without(rng):
    x, q, lt = _data(rng, signal=1.0)
    _, strong = fit.fit_state(init_state(4, 6), [0, 1, 2], x, q, lt, fit.prior_grid(np.arange(6) < 5, [0.1, 1e4]))
    x2, q2, lt2 = _data(rng, signal=0.0)
    _, none = fit.fit_state(init_state(4, 6), [0, 1, 2], x2, q2, lt2, fit.prior_grid(np.arange(6) < 5, [0.1, 1e4]))
    assert np.all(strong[:, 0] == 0.1) and np.all(none[:, 0] == 1e4)


def test_prior_weight_keeps_predictions_and_widens_the_posterior(rng):
    """A discounted log (power prior w): theta unchanged, widths x 1/sqrt(w), count w n, and one
    online observation moves the arm like 1/w logged ones."""
    from mixllm_jax.core import bandit

    x, q, lt = _data(rng)
    pen = np.arange(6) < 5
    full, _ = fit.fit_state(init_state(4, 6), [0, 1, 2], x, q, lt, fit.prior_grid(pen, [3.0]))
    w = 0.1
    disc, _ = fit.fit_state(init_state(4, 6), [0, 1, 2], x, q, lt, fit.prior_grid(pen, [3.0]), prior_weight=w)
    xq = x[:7]
    (y1, u1), (y2, u2) = bandit.predict(full, xq), bandit.predict(disc, xq)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(u2)[:, :3], np.asarray(u1)[:, :3] / np.sqrt(w), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(disc.count)[:3], w * np.asarray(full.count)[:3], rtol=1e-6)
    # one observation of weight 1 on the discounted arm == weight 1/w on the full-weight arm
    t = np.array([[5.0, 1.0]], np.float32)
    a = bandit.update_arms(disc, xq[:1], np.array([0]), t, np.array([1.0], np.float32))
    b = bandit.update_arms(full, xq[:1], np.array([0]), t, np.array([1 / w], np.float32))
    np.testing.assert_allclose(np.asarray(bandit.predict(a, xq)[0]), np.asarray(bandit.predict(b, xq)[0]), atol=2e-3)
    import pytest
    with pytest.raises(ValueError, match="prior_weight"):
        fit.fit_state(init_state(4, 6), [0], x, q[:, :1], lt[:, :1], fit.prior_grid(pen, [3.0]), prior_weight=0.0)


def test_domain_precision_pulls_domain_intercepts_to_the_arm_mean_not_to_zero(rng):
    """Features [x, 2 domain one-hots, bias]: a free domain intercept gives each domain its own mean;
    a huge domain precision gives both the arm's overall mean (the bias is free); both equal numpy's
    closed form with that prior; the evidence picks the free one when the domains differ."""
    n = 400
    dom = (np.arange(n) % 4 == 0).astype(int)  # domain 1 is a quarter of the log
    x = np.concatenate([0.01 * rng.normal(size=(n, 2)), np.eye(2)[dom], np.ones((n, 1))], 1).astype(np.float32)
    q = np.where(dom == 1, 0.9, 0.3)[:, None] + 0.05 * rng.normal(size=(n, 1))
    q, lt = q.astype(np.float32), np.zeros((n, 1), np.float32)
    pen, domain = np.arange(5) < 2, (np.arange(5) >= 2) & (np.arange(5) < 4)
    grid = fit.prior_grid(pen, [1e6], domain, [0.1, 1e7])
    np.testing.assert_allclose(grid[:, 2:4], [[0.1, 0.1], [1e7, 1e7]], rtol=1e-6)
    assert np.all(grid[:, 4] == fit.INTERCEPT_PRECISION) and np.all(grid[:, :2] == 1e6)
    probe = np.array([[0, 0, 1, 0, 1], [0, 0, 0, 1, 1]], np.float32)
    for row, want in ((0, [0.3, 0.9]), (1, [q.mean()] * 2)):
        st, _ = fit.fit_state(init_state(2, 5), [0], x, q, lt, grid[row:row + 1])
        got = np.asarray(st.A_inv[0] @ st.B[0])[:, 0]
        theta = np.linalg.solve(np.diag(grid[row].astype(np.float64)) + x.T.astype(np.float64) @ x, x.T @ q[:, 0])
        # predictions, not coefficients: the bias / one-hot direction is set by the tiny priors alone
        np.testing.assert_allclose(probe @ got, probe @ theta, atol=2e-3)
        np.testing.assert_allclose(probe @ got, want, atol=0.02)
    _, chosen = fit.fit_state(init_state(2, 5), [0], x, q, lt, grid)
    assert chosen[0, 2] == np.float32(0.1)

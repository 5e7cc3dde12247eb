"""Offline fit of every arm from logged outcomes, with each arm's prior precisions chosen by evidence.

Bayesian linear regression per arm: y = x^T theta + noise (s.d. sigma), prior theta ~ N(0, sigma^2
diag(p)^-1), p one row of a grid of candidate prior precisions (`prior_grid`): the ridge r on the
embedding coefficients, a precision s on the domain intercepts (s small: each domain's intercept
free; large: pulled towards the arm's overall mean, never towards 0, since the bias is free) and a
tiny precision on the bias. Each arm takes the row of highest marginal likelihood (evidence), or
the caller passes one row (chosen on validation, train.py). sigma^2 at the chosen row is the arm's
noise scale, which makes the LinUCB width a posterior s.d. See docs/architecture.md, "Predictors".
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from mixllm_jax.core.bandit import spd_inverse
from mixllm_jax.core.state import QUALITY, RouterState, shared_prior

INTERCEPT_PRECISION = 0.1  # prior precision of intercept features: ~0.1 pseudo-observations


def sufficient_stats(x, y, observed):
    """Per-arm statistics of the log. x [N, d], y [N, M, T] targets, observed [N, M] 0/1 weights.

    Returns S = X^T W X [M, d, d], b = X^T W Y [M, d, T], yy = sum w y^2 [M, T], n [M].
    """
    xw = observed[:, :, None] * x[:, None, :]  # [N, M, d]
    return (jnp.einsum("nmi,nj->mij", xw, x), jnp.einsum("nmi,nmt->mit", xw, y),
            jnp.einsum("nm,nmt->mt", observed, y * y), observed.sum(0))


def log_evidence(S, b, yy, n, prior):
    """Log marginal likelihood of one arm's quality target at prior precision [d], sigma profiled.

    With A = diag(prior) + S and theta = A^-1 b: rss + theta^T diag(prior) theta = yy - theta.b, so
    sigma^2 = (yy - theta.b) / n and log p = -n/2 log sigma^2 + 1/2 log|diag(prior)| - 1/2 log|A|
    (constants dropped). Returns (log evidence, sigma^2).
    """
    L = jnp.linalg.cholesky(jnp.diag(prior) + S)  # a Cholesky factor: ~10x cheaper than eigh here
    theta = jax.scipy.linalg.cho_solve((L, True), b[:, QUALITY])
    s2 = jnp.maximum(yy[QUALITY] - theta @ b[:, QUALITY], 1e-6) / jnp.maximum(n, 1.0)
    log_det = 2.0 * jnp.log(jnp.diagonal(L)).sum()
    return -0.5 * n * jnp.log(s2) + 0.5 * jnp.log(prior).sum() - 0.5 * log_det, s2


def prior_grid(penalized: np.ndarray, ridges: Sequence[float], domain: np.ndarray | None = None,
               domain_precisions: Sequence[float] = (INTERCEPT_PRECISION,)) -> np.ndarray:
    """Candidate prior precisions [R * S, d]: ridge r (of R) on the `penalized` [d] features,
    precision s (of S) on the `domain` [d] features, INTERCEPT_PRECISION on the rest (the bias)."""
    penalized = np.asarray(penalized, bool)
    domain = np.zeros_like(penalized) if domain is None else np.asarray(domain, bool)
    return np.array([np.where(penalized, r, np.where(domain, s, INTERCEPT_PRECISION))
                     for r in ridges for s in domain_precisions], np.float32)


@jax.jit
def choose_prior(S, b, yy, n, priors):
    """Per arm, the candidate prior precision (a row of priors [C, d]) of highest evidence.

    Returns (row index [M], prior precision [M, d], sigma^2 [M]).
    """
    ev, s2 = jax.vmap(lambda p: jax.vmap(log_evidence, (0, 0, 0, 0, None))(S, b, yy, n, p))(priors)
    best = jnp.argmax(ev, axis=0)  # [M]
    return best, priors[best], s2[best, jnp.arange(S.shape[0])]


def log_targets(quality: np.ndarray, log_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The targets y [N, M, 2] (quality, log tokens; 0 where unobserved) and observed [N, M] 0/1 of
    a log: quality, log_tokens [N, M] (NaN quality = not observed)."""
    obs = np.isfinite(quality)
    y = np.stack([np.where(obs, quality, 0.0), np.where(obs, log_tokens, 0.0)], -1).astype(np.float32)
    return y, obs.astype(np.float32)


def arm_stats(x: np.ndarray, quality: np.ndarray, log_tokens: np.ndarray):
    """sufficient_stats of a log: x [N, d]; quality, log_tokens [N, M] (NaN quality = not observed).
    mesh.arm_stats computes the same sums over a device mesh."""
    y, obs = log_targets(quality, log_tokens)
    return sufficient_stats(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.asarray(obs))


def state_from_stats(state: RouterState, slots: Sequence[int], stats, priors: np.ndarray,
                     prior_weight: float = 1.0) -> tuple[RouterState, np.ndarray]:
    """Fill the arms at `slots` (one per data column) from arm_stats, exactly and at once.

    Each arm gets A = w (diag(prior) + X^T X), B = w X^T Y, count w n and its noise, with prior its
    row of highest evidence among the candidates priors [C, d] (`prior_grid`); A_inv is computed
    from A. w = prior_weight in (0, 1] discounts the log (a power prior): theta = A^-1 B is
    unchanged, but the log counts as w n pseudo-
    observations, so the posterior s.d.s (widths) grow by 1 / sqrt(w) and an online observation
    (weight 1) moves an arm as much as 1 / w logged ones. The state's fresh-arm prior becomes the
    median chosen prior. Returns (state, chosen prior precision [M, d]).
    """
    if not 0.0 < prior_weight <= 1.0:
        raise ValueError(f"prior_weight must be in (0, 1], got {prior_weight!r}")
    S, b, yy, n = stats
    w = jnp.float32(prior_weight)
    _, prior, s2 = choose_prior(S, b, yy, n, jnp.asarray(priors, jnp.float32))
    sl = jnp.asarray(np.asarray(slots, np.int32))
    b = jnp.pad(b, ((0, 0), (0, 0), (0, state.n_targets - b.shape[2])))
    A = w * (jax.vmap(jnp.diag)(prior) + S)
    # the inverse eagerly, on purpose: XLA CPU may run two LAPACK calls of one jitted program
    # concurrently, which was seen to deadlock (jaxlib 0.10.2); only the filled arms are inverted
    state = _fill(state, sl, A, spd_inverse(A), w * b, w * n, jnp.sqrt(s2), jnp.median(prior, axis=0))
    return state, np.asarray(prior)


@jax.jit
def _fill(state: RouterState, sl, A, A_inv, B, count, noise, ridge) -> RouterState:
    """The state with arms sl [M] set and the shared online component back at its prior (of the
    new ridge): one compiled program (eager scatters cost ~30 ms each)."""
    return state.replace(A=state.A.at[sl].set(A), A_inv=state.A_inv.at[sl].set(A_inv), B=state.B.at[sl].set(B),
                         count=state.count.at[sl].set(count), noise=state.noise.at[sl].set(noise), ridge=ridge,
                         **shared_prior(ridge, state.n_targets))


def fit_state(state: RouterState, slots: Sequence[int], x: np.ndarray, quality: np.ndarray,
              log_tokens: np.ndarray, priors: np.ndarray, prior_weight: float = 1.0) -> tuple[RouterState, np.ndarray]:
    """state_from_stats of a whole log: x [N, d]; quality, log_tokens [N, M]; priors [C, d] (prior_grid)."""
    return state_from_stats(state, slots, arm_stats(x, quality, log_tokens), priors, prior_weight)

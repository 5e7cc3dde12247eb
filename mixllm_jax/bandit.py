"""Per-arm ridge regression (LinUCB) over the stacked state: predictions and exact online updates.

Arm k keeps A_k = r I + sum w x x^T, its inverse A_inv_k, and B_k = sum w x y^T for T targets;
theta_k = A_inv_k B_k. One inverse serves all targets, since they share the inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixllm_jax.state import RouterState


def theta(state: RouterState) -> jnp.ndarray:
    """Ridge coefficients of every arm: [K, d, T]."""
    return jnp.einsum("kij,kjt->kit", state.A_inv, state.B)


def predict(state: RouterState, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Targets and LinUCB widths for a batch x [B, d].

    Returns (y_hat [B, K, T], width [B, K]) with width = sqrt(x^T A_inv_k x).
    """
    y_hat = jnp.einsum("bi,kit->bkt", x, theta(state))
    ax = jnp.einsum("bi,kij->bkj", x, state.A_inv)  # K matmuls [B, d] x [d, d]
    width = jnp.sqrt(jnp.maximum(jnp.einsum("bkj,bj->bk", ax, x), 0.0))
    return y_hat, width


def _sherman_morrison(A, A_inv, B, x, y, w):
    """One weighted rank-one step for one arm: A [d, d], A_inv [d, d], B [d, T], x [d], y [T], w []."""
    u = A_inv @ x
    denom = 1.0 + w * (x @ u)
    A_inv = A_inv - (w / denom) * jnp.outer(u, u)
    return A + w * jnp.outer(x, x), A_inv, B + w * jnp.outer(x, y)


_sm_across_arms = jax.vmap(_sherman_morrison)


@jax.jit
def update_batch(state: RouterState, x: jnp.ndarray, arm: jnp.ndarray, targets: jnp.ndarray,
                 weight: jnp.ndarray | None = None) -> RouterState:
    """Add observations (x [B, d], arm [B] int, targets [B, T], weight [B] >= 0) to the state.

    Unchecked and jit-compiled (one compile per batch shape); see `engine.update` for the checked,
    bucketed entry point. Rows with weight 0 are skipped (padding). The result equals applying the
    observations one at a time in batch order: the batch is processed in rounds, round r applying
    the r-th observation of every arm at once (Sherman-Morrison vmapped across arms), for as many
    rounds as the busiest arm has observations.
    """
    n, K = x.shape[0], state.capacity
    w = jnp.ones((n,), jnp.float32) if weight is None else weight.astype(jnp.float32)
    # Weight-0 rows (padding) go to a sentinel arm K that sorts last and is never applied.
    arm = jnp.where(w > 0, arm.astype(jnp.int32), K)
    # Rank of each observation among its arm's observations, preserving batch order.
    order = jnp.argsort(arm, stable=True)
    counts = jnp.zeros((K,), jnp.int32).at[arm].add(1, mode="drop")
    start = jnp.cumsum(counts) - counts  # [K] first position of each arm in `order`

    def body(carry):
        r, A, A_inv, B = carry
        has = r < counts  # [K]
        pos = jnp.minimum(start + r, n - 1)
        idx = order[pos]  # [K] batch index of arm k's r-th observation
        wk = jnp.where(has, w[idx], 0.0)
        A, A_inv, B = _sm_across_arms(A, A_inv, B, x[idx], targets[idx], wk)
        return r + 1, A, A_inv, B

    _, A, A_inv, B = jax.lax.while_loop(
        lambda c: c[0] < counts.max(), body, (0, state.A, state.A_inv, state.B))
    A_inv = 0.5 * (A_inv + jnp.swapaxes(A_inv, 1, 2))  # keep it exactly symmetric
    return state.replace(A=A, A_inv=A_inv, B=B, count=state.count + counts)



@jax.jit
def drift(state: RouterState) -> jnp.ndarray:
    """Per-arm float32 drift of A_inv from the exact inverse: max |A_k A_inv_k - I|, [K]."""
    eye = jnp.eye(state.dim, dtype=jnp.float32)
    return jnp.abs(jnp.einsum("kij,kjl->kil", state.A, state.A_inv) - eye).max(axis=(1, 2))


@jax.jit
def refresh(state: RouterState, which: jnp.ndarray | None = None) -> RouterState:
    """Recompute A_inv from the precision matrix A by Cholesky for arms where `which` [K] is True."""
    eye = jnp.eye(state.dim, dtype=jnp.float32)
    chol = jnp.linalg.cholesky(state.A)
    fresh = jax.vmap(lambda L: jax.scipy.linalg.cho_solve((L, True), eye))(chol)
    fresh = 0.5 * (fresh + jnp.swapaxes(fresh, 1, 2))
    if which is not None:
        fresh = jnp.where(which[:, None, None], fresh, state.A_inv)
    return state.replace(A_inv=fresh)


def merge(base: RouterState, *replicas: RouterState) -> RouterState:
    """Merge replicas that started from `base`: sum their additive deltas of A, B and count.

    Exact, because updates are additive in (A, B); A_inv is recomputed by Cholesky.
    """
    A, B, count = base.A, base.B, base.count
    for rep in replicas:
        A, B, count = A + rep.A - base.A, B + rep.B - base.B, count + rep.count - base.count
    return refresh(base.replace(A=A, B=B, count=count))

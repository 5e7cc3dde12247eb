"""Per-arm ridge regression (LinUCB) over the stacked state: predictions and online updates.

Arm k keeps A_k = r I + sum w x x^T, its inverse A_inv_k, and B_k = sum w x y^T for T targets;
theta_k = A_inv_k B_k. One inverse serves all targets, since they share the inputs. Every arm's
prediction adds the shared online component's x^T phi (phi = shared_A_inv shared_B, 0 until
online feedback arrives); `split` divides each observation's surprise between the observed arm
and phi (docs/architecture.md, "Online learning").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from mixllm_jax.core.padding import pad_rows
from mixllm_jax.core.state import RouterState


def theta(state: RouterState) -> jnp.ndarray:
    """Ridge coefficients of every arm: [K, d, T]."""
    return jnp.einsum("kij,kjt->kit", state.A_inv, state.B)


def shared_theta(state: RouterState) -> jnp.ndarray:
    """Coefficients of the shared online component: [d, T]."""
    return state.shared_A_inv @ state.shared_B


def predict(state: RouterState, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Targets and LinUCB widths for a batch x [B, d].

    Returns (y_hat [B, K, T], width [B, K]): y_hat = x^T (theta_k + phi), width = noise_k *
    sqrt(x^T A_inv_k x), the posterior s.d. of the arm's own part (phi's is the same for every arm,
    so it changes no decision).
    """
    y_hat = jnp.einsum("bi,kit->bkt", x, theta(state)) + (x @ shared_theta(state))[:, None, :]
    return y_hat, state.noise * jnp.sqrt(jnp.maximum(_quadratic_forms(x, state.A_inv), 0.0))


SHARED_MIN_COUNT = 20.0  # observations an arm needs before its surprises teach the shared component in full


def split(state: RouterState, x: jnp.ndarray, arm: jnp.ndarray, targets: jnp.ndarray,
          w: jnp.ndarray) -> tuple[RouterState, jnp.ndarray]:
    """Share a batch's surprises between the observed arms and the shared component.

    x [B, d], arm [B] int (clipped into range: padding rows go with weight 0), targets [B, T], w [B]
    (0: skipped). Each row's surprise
    r = y - x^T (theta_k + phi) is split as a Kalman step with independent posteriors would
    (mean field, in units of the arm's noise), the shared component's covariance seen through the
    observed arm's evidence rho_k = min(1, count_k / SHARED_MIN_COUNT): the arm moves by
    A_inv_k x r / den and phi by rho_k shared_A_inv x r / den, den = 1 + u_k + rho_k u_s,
    u_k = x^T A_inv_k x, u_s = x^T shared_A_inv x. Both are ordinary ridge steps: the arm's with the
    target y_k = x^T theta_k + r (1 + u_k) / den, phi's with the target
    y_s = x^T phi + r (1 + rho_k u_s) / den at weight rho_k w. An arm that has seen little (an LLM
    just added) thus teaches the shared component little, so one observation of it cannot move
    every other arm (rho_k = 1, the plain split, once it has SHARED_MIN_COUNT observations, offline
    pseudo-observations included). The split uses the state before the batch; phi
    takes its rows in rank-MAX_CHUNK Woodbury steps, finished before anything uses the results (an
    optimization barrier: XLA CPU running two LAPACK loops of one program at once, e.g. these and
    the arms' steps, was seen to deadlock; see fit.state_from_stats). Returns (state with phi
    updated, y_k [B, T]).
    """
    arm = jnp.clip(arm.astype(jnp.int32), 0, state.capacity - 1)
    y_arm = jnp.einsum("bi,bit->bt", x, theta(state)[arm])
    y_sh = x @ shared_theta(state)
    u_arm = _own_quadratic_forms(x, arm, w, state.A_inv)
    u_sh = jnp.einsum("bi,ij,bj->b", x, state.shared_A_inv, x)
    rho = jnp.clip(state.count[arm] / SHARED_MIN_COUNT, 0.0, 1.0)
    r = targets - y_arm - y_sh
    den = 1.0 + u_arm + rho * u_sh
    y_k = y_arm + r * ((1.0 + u_arm) / den)[:, None]
    y_s = y_sh + r * ((1.0 + rho * u_sh) / den)[:, None]
    m = min(MAX_CHUNK, x.shape[0])
    n = -(-x.shape[0] // m) * m
    xs, ys, ws = (pad_rows(a, n).reshape((n // m, m) + a.shape[1:]) for a in (x, y_s, w * rho))  # weight 0: no-ops

    def step(carry, chunk):
        return _woodbury(*carry, *chunk), None

    (A, A_inv, B), _ = jax.lax.scan(step, (state.shared_A, state.shared_A_inv, state.shared_B), (xs, ys, ws))
    return jax.lax.optimization_barrier((state.replace(shared_A=A, shared_A_inv=0.5 * (A_inv + A_inv.T), shared_B=B), y_k))


WIDTH_CHUNK = 256  # rows per block of the width computation: keeps [rows, K, d] cache-sized


def _quadratic_forms(x, A_inv):
    """x_b^T A_inv_k x_b for every query and arm: x [B, d], A_inv [K, d, d] -> [B, K].

    K matmuls [rows, d] x [d, d] per block; large batches go in blocks of WIDTH_CHUNK rows (a
    lax.map) so the [rows, K, d] intermediate stays small (~25% faster on CPU at B = 4096).
    """
    def block(xb):
        return jnp.einsum("bkj,bj->bk", jnp.einsum("bi,kij->bkj", xb, A_inv), xb)

    n = x.shape[0]
    if n > WIDTH_CHUNK and n % WIDTH_CHUNK == 0:
        return jax.lax.map(block, x.reshape(n // WIDTH_CHUNK, WIDTH_CHUNK, -1)).reshape(n, -1)
    return block(x)


def spd_inverse(S):
    """Inverse of a symmetric positive-definite matrix [..., n, n]: Cholesky solve, refined.

    (On CPU a batched Cholesky solve costs ~1/10 of an eigendecomposition at d = 400.)
    """
    L = jnp.linalg.cholesky(S)
    eye = jnp.broadcast_to(jnp.eye(S.shape[-1], dtype=S.dtype), S.shape)
    X = jax.scipy.linalg.cho_solve((L, True), eye)
    X = 2 * X - X @ S @ X  # one Newton-Schulz step squares the residual
    return 0.5 * (X + jnp.swapaxes(X, -1, -2))


def _woodbury(A, A_inv, B, X, Y, w):
    """m weighted observations of one arm at once: A, A_inv [d, d], B [d, T], X [m, d], Y [m, T], w [m].

    A_inv <- A_inv - U (I + Xs U)^-1 U^T with Xs = sqrt(w) X, U = A_inv Xs^T: exactly m successive
    Sherman-Morrison rank-one steps (m = 1 is Sherman-Morrison), in matmuls. Weight-0 rows are no-ops.
    """
    Xs = X * jnp.sqrt(w)[:, None]
    U = A_inv @ Xs.T  # [d, m]
    S = jnp.eye(X.shape[0], dtype=X.dtype) + Xs @ U  # [m, m], SPD, eigenvalues >= 1
    A_inv = A_inv - U @ spd_inverse(S) @ U.T
    return A + Xs.T @ Xs, A_inv, B + (X * w[:, None]).T @ Y


MAX_CHUNK = 64


@jax.jit
def update_batch(state: RouterState, x: jnp.ndarray, arm: jnp.ndarray, targets: jnp.ndarray,
                 weight: jnp.ndarray | None = None) -> RouterState:
    """Add observations (x [B, d], arm [B] int, targets [B, T], weight [B] >= 0) to the state.

    Unchecked and jit-compiled (one compile per batch shape); see `engine.update` for the checked,
    bucketed entry point. Rows with weight 0 are skipped (padding). First `split` gives each row's
    share to the shared component and returns the arms' targets; then `update_arms`.
    """
    n = x.shape[0]
    w = jnp.ones((n,), jnp.float32) if weight is None else weight.astype(jnp.float32)
    state, y_k = split(state, x, arm, targets, w)
    return update_arms(state, x, arm, y_k, w)


def _arm_chunks(arm: jnp.ndarray, w: jnp.ndarray, K: int):
    """Each arm's rows (weight > 0), in batch order, cut into chunks of m = clip(B // K, 1, 64) rows
    (a power of two). Returns (number of chunks, chunk(c) -> (arm k, row indices [m], valid [m]),
    rows per arm [K])."""
    n = arm.shape[0]
    m = min(MAX_CHUNK, 1 << max(0, (n // K).bit_length() - 1))
    # Weight-0 rows (padding) go to a sentinel arm K that sorts last and is never applied.
    arm = jnp.where(w > 0, arm.astype(jnp.int32), K)
    order = jnp.argsort(arm, stable=True)  # each arm's observations, contiguous, in batch order
    counts = jnp.zeros((K,), jnp.int32).at[arm].add(1, mode="drop")
    start = jnp.cumsum(counts) - counts  # [K] first position of each arm in `order`
    chunks = (counts + m - 1) // m
    chunk_end = jnp.cumsum(chunks)  # [K]: chunks of arms 0..k
    j = jnp.arange(m)

    def chunk(c):
        k = jnp.searchsorted(chunk_end, c, side="right")  # arm of chunk c
        rank = (c - (chunk_end[k] - chunks[k])) * m + j  # [m] ranks within the arm
        return k, order[jnp.minimum(start[k] + rank, n - 1)], rank < counts[k]

    return chunk_end[-1], chunk, counts


def _own_quadratic_forms(x: jnp.ndarray, arm: jnp.ndarray, w: jnp.ndarray, A_inv: jnp.ndarray) -> jnp.ndarray:
    """x_b^T A_inv[arm_b] x_b for each row's own arm [B] (0 for weight-0 rows), in the chunks of
    `_arm_chunks`: B d^2 work instead of _quadratic_forms' B K d^2."""
    n = x.shape[0]
    n_chunks, chunk, _ = _arm_chunks(arm, w, A_inv.shape[0])

    def body(carry):
        c, u = carry
        k, idx, valid = chunk(c)
        q = jnp.einsum("md,de,me->m", x[idx], A_inv[k], x[idx])
        return c + 1, u.at[jnp.where(valid, idx, n)].set(q, mode="drop")

    return jax.lax.while_loop(lambda c: c[0] < n_chunks, body, (0, jnp.zeros((n,), x.dtype)))[1]


@jax.jit
def update_arms(state: RouterState, x: jnp.ndarray, arm: jnp.ndarray, targets: jnp.ndarray,
                weight: jnp.ndarray | None = None) -> RouterState:
    """Ridge steps of the arms alone: (x [B, d], arm [B], targets [B, T], weight [B]) added to
    each row's arm, with the result of applying them one at a time in batch order (the closed-form
    ridge of each arm's rows): each arm's rows, in batch order, are cut into chunks of
    m = clip(B // K, 1, 64) (a power of two) and every chunk is one rank-m Woodbury step on its
    arm. A loop over the chunks that exist (at most B / m + K) keeps the work proportional to B
    whether the batch is spread over arms or all on one.
    """
    w = jnp.ones((x.shape[0],), jnp.float32) if weight is None else weight.astype(jnp.float32)
    n_chunks, chunk, counts = _arm_chunks(arm, w, state.capacity)

    def body(carry):
        c, A, A_inv, B = carry
        k, idx, valid = chunk(c)
        a, ai, b = _woodbury(A[k], A_inv[k], B[k], x[idx], targets[idx], jnp.where(valid, w[idx], 0.0))
        return c + 1, A.at[k].set(a), A_inv.at[k].set(ai), B.at[k].set(b)

    _, A, A_inv, B = jax.lax.while_loop(lambda c: c[0] < n_chunks, body, (0, state.A, state.A_inv, state.B))
    A_inv = 0.5 * (A_inv + jnp.swapaxes(A_inv, 1, 2))  # keep it exactly symmetric
    return state.replace(A=A, A_inv=A_inv, B=B, count=state.count + counts)


def _stacked(state: RouterState) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(A, A_inv) of the arms and, last, the shared component: [K + 1, d, d]."""
    return (jnp.concatenate([state.A, state.shared_A[None]]), jnp.concatenate([state.A_inv, state.shared_A_inv[None]]))


@jax.jit
def drift(state: RouterState) -> jnp.ndarray:
    """Float32 drift of each inverse from the exact one, max |A A_inv - I|: [K + 1] (the arms',
    then the shared component's)."""
    A, A_inv = _stacked(state)
    eye = jnp.eye(state.dim, dtype=jnp.float32)
    return jnp.abs(jnp.einsum("kij,kjl->kil", A, A_inv) - eye).max(axis=(1, 2))


@jax.jit
def refresh(state: RouterState, which: jnp.ndarray | None = None) -> RouterState:
    """Recompute the inverses from the precision matrices where `which` [K + 1] is True (the
    arms, then the shared component; None: all)."""
    A, A_inv = _stacked(state)
    fresh = spd_inverse(A)
    if which is not None:
        fresh = jnp.where(which[:, None, None], fresh, A_inv)
    return state.replace(A_inv=fresh[:-1], shared_A_inv=fresh[-1])


def merge(base: RouterState, *replicas: RouterState) -> RouterState:
    """Merge replicas that started from `base`: sum their additive deltas of A, B and count (the
    arms' and the shared component's).

    Exact given each replica's steps, because those are additive in (A, B); the inverses are
    recomputed from A.
    """
    fields = ("A", "B", "count", "shared_A", "shared_B")
    total = {f: getattr(base, f) for f in fields}
    for rep in replicas:
        total = {f: total[f] + getattr(rep, f) - getattr(base, f) for f in fields}
    return refresh(base.replace(**total))


@jax.jit
def maintain(state: RouterState, tol: float = 1e-4) -> tuple[RouterState, jnp.ndarray]:
    """Detect float32 drift and refresh the inverses past `tol`. Returns (state, drift [K + 1]).

    Costs about one d^3 matmul per arm: call it every few thousand updates, not per batch.
    """
    dr = drift(state)
    bad = dr > tol
    return jax.lax.cond(bad.any(), lambda s: refresh(s, bad), lambda s: s, state), dr

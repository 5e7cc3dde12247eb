"""Checked entry points: validate at the Python boundary, pad batches to buckets, call the jitted core.

`route` and `update` check every input (a clear ValueError naming the field and value; the state
is never modified since every function returns a new one) and pad the batch to the next size in
`BATCH_BUCKETS`, so a serving loop with varying batch sizes compiles a bounded number of times.
`policy.route_batch` and `bandit.update_batch` are the unchecked jitted functions for hot loops that
already hold clean, fixed-shape arrays.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from mixllm_jax import bandit
from mixllm_jax.policy import Decision, Policy, route_batch
from mixllm_jax.state import RouterState

BATCH_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192)


def bucket(n: int, buckets=BATCH_BUCKETS) -> int:
    """Smallest of the (ascending) buckets >= n; past the largest, the next multiple of it."""
    for b in buckets:
        if n <= b:
            return int(b)
    top = buckets[-1]
    return -(-n // top) * top


def _pad(a: np.ndarray, size: int, value=0) -> np.ndarray:
    pad = [(0, size - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
    return np.pad(a, pad, constant_values=value)


def _finite_matrix(name: str, a, shape_tail: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail:
        want = "[B" + "".join(f", {s}" for s in shape_tail) + "]"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    bad = np.argwhere(~np.isfinite(a))
    if bad.size:
        i = tuple(bad[0])
        raise ValueError(f"{name} must be finite, got {a[i]} at index {list(map(int, i))}")
    return a


def _batch_vector(name: str, a, n: int, *, nonneg: bool = True) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a) | ((a < 0) if nonneg else False))
    if bad.size:
        raise ValueError(f"{name} must be finite and >= 0, got {a[bad[0]]} at index {bad[0]}")
    return a


def route(state: RouterState, x, prompt_tokens, policy: Policy, bonus=None, key=None) -> Decision:
    """Checked, bucketed `route_batch`: x [B, d], prompt_tokens [B] -> Decision sliced to B rows.

    key: a jax.random key, required when the policy is stochastic (Thompson sampling, a softmax
    temperature > 0 or epsilon > 0); split it for every call, or the draws repeat.
    """
    x = _finite_matrix("x", x, (state.dim,))
    n = x.shape[0]
    prompt_tokens = _batch_vector("prompt_tokens", prompt_tokens, n)
    if not bool(np.asarray(state.active).any()):
        raise ValueError("state has no active arm to route to")
    for field in ("cost_weight", "alpha", "beta", "tau", "temperature", "epsilon"):
        v = float(getattr(policy, field))
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"policy.{field} must be finite and >= 0, got {v}")
    if float(policy.epsilon) > 1:
        raise ValueError(f"policy.epsilon must be in [0, 1], got {float(policy.epsilon)}")
    if policy.stochastic and key is None:
        raise ValueError(f"a stochastic policy (explore={policy.explore!r}, temperature "
                         f"{float(policy.temperature):g}, epsilon {float(policy.epsilon):g}) needs a PRNG key: "
                         "pass key=jax.random.PRNGKey(seed) (split it per call)")
    if key is not None:
        key = jnp.asarray(key)
        if key.shape != (2,) or key.dtype != jnp.uint32:
            raise ValueError(f"key must be a jax.random.PRNGKey (uint32 [2]), got {key.dtype} {key.shape}")
    size = bucket(n)
    if bonus is not None:
        bonus = jnp.asarray(_pad(_finite_matrix("bonus", bonus, (state.capacity,)), size))
    valid = np.arange(size) < n
    d = route_batch(state, jnp.asarray(_pad(x, size)), jnp.asarray(_pad(prompt_tokens, size)),
                    policy, jnp.asarray(valid), bonus, key)
    return d.replace(**{k: getattr(d, k)[:n] for k in
                        ("arm", "quality", "tokens", "cost", "uncertainty", "wait", "penalty", "score",
                         "propensity")})


def update(state: RouterState, x, arm, targets, weight=None) -> RouterState:
    """Checked, bucketed `update_batch`: x [B, d], arm [B] (active slots), targets [B, T], weight [B]."""
    x = _finite_matrix("x", x, (state.dim,))
    n = x.shape[0]
    targets = _finite_matrix("targets", targets, (state.n_targets,))
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} rows but x has {n}")
    arm_arr = np.asarray(arm)
    if arm_arr.shape != (n,) or not np.issubdtype(arm_arr.dtype, np.integer):
        raise ValueError(f"arm must be an integer array of shape ({n},), got {arm_arr.dtype} {arm_arr.shape}")
    active = np.asarray(state.active)
    bad = np.flatnonzero((arm_arr < 0) | (arm_arr >= state.capacity))
    if bad.size:
        raise ValueError(f"arm must be in [0, {state.capacity}), got {arm_arr[bad[0]]} at index {bad[0]}")
    bad = np.flatnonzero(~active[arm_arr])
    if bad.size:
        raise ValueError(f"arm {arm_arr[bad[0]]} (index {bad[0]}) is not an active arm")
    w = np.ones(n, np.float32) if weight is None else _batch_vector("weight", weight, n)
    size = bucket(n)
    return bandit.update_batch(state, jnp.asarray(_pad(x, size)),
                               jnp.asarray(_pad(arm_arr.astype(np.int32), size)),
                               jnp.asarray(_pad(targets, size)), jnp.asarray(_pad(w, size)))

"""Checked entry points: validate at the Python boundary, pad batches to buckets, call the jitted core.

`route` and `update` check every input (a clear ValueError naming the field and value; the state
is never modified since every function returns a new one): shapes, dtypes, finite values within
the ranges below (in float32 terms: no accepted input overflows the float32 state) and pad the batch to the next size of
`padding.bucket`, so a serving loop with varying batch sizes compiles a bounded number of times.
`policy.route_batch` and `bandit.update_batch` are the unchecked jitted functions for hot loops that
already hold clean, fixed-shape arrays.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from mixllm_jax.core import bandit
from mixllm_jax.core.padding import bucket, pad_rows
from mixllm_jax.core.policy import Decision, Policy, route_batch
from mixllm_jax.core.state import RouterState

MAX_ABS_X = 1e4  # |feature| (features are unit-norm embeddings, domain one-hots and a bias)
MAX_ABS_TARGET = 1e6  # |quality| and |log tokens| targets
MAX_WEIGHT = 1e6  # observation weights are in [0, MAX_WEIGHT]
MAX_PROMPT_TOKENS = 1e9
MAX_POLICY = 1e12  # cost_weight, mix_cost_weight, alpha, beta, tau


def _as_f32(name: str, a) -> np.ndarray:
    """`a` as a float32 array, or a ValueError naming it (huge Python ints, strings, ragged lists)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(a)
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"dtype {arr.dtype}")
            return arr.astype(np.float32)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{name} must be an array of numbers ({type(e).__name__}: {str(e)[:80]})") from None


def _finite_matrix(name: str, a, shape_tail: tuple[int, ...], bound: float) -> np.ndarray:
    a = _as_f32(name, a)
    if a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail:
        want = "[B" + "".join(f", {s}" for s in shape_tail) + "]"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    bad = np.argwhere(~(np.abs(a) <= bound))  # NaN, inf and |a| > bound
    if bad.size:
        i = tuple(bad[0])
        raise ValueError(f"{name} must be finite, got {a[i]} at index {list(map(int, i))} "
                         f"(accepted: |value| <= {bound:g})")
    return a


def _batch_vector(name: str, a, n: int, *, hi: float) -> np.ndarray:
    a = _as_f32(name, a)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    bad = np.flatnonzero(~((a >= 0) & (a <= hi)))
    if bad.size:
        raise ValueError(f"{name} must be finite and >= 0, got {a[bad[0]]} at index {bad[0]} "
                         f"(accepted: [0, {hi:g}])")
    return a


POLICY_RANGES = {f: (0.0, 1.0 if f in ("mix", "epsilon") else MAX_POLICY)
                 for f in ("cost_weight", "mix_cost_weight", "alpha", "beta", "tau", "mix", "temperature", "epsilon")}


def check_policy(policy: Policy) -> Policy:
    """The policy, or a ValueError naming the field and value: every number a finite scalar in its
    range (POLICY_RANGES); the exploration mode is checked by Policy itself."""
    for field, (lo, hi) in POLICY_RANGES.items():
        try:
            v = _as_f32(f"policy.{field}", getattr(policy, field))
        except ValueError:
            raise ValueError(f"policy.{field} must be a number") from None
        if v.shape != () or not (lo <= float(v) <= hi):
            raise ValueError(f"policy.{field} must be a finite number in [{lo:g}, {hi:g}], got {v!r:.40}")
    return policy


def check_route(state: RouterState, x, prompt_tokens, policy: Policy, bonus=None, key=None):
    """The checks of `route`: (x [B, d], prompt_tokens [B], bonus [B, K] | None, key | None) as
    clean arrays, or a ValueError naming the field and value. Also used by mesh.route."""
    x = _finite_matrix("x", x, (state.dim,), MAX_ABS_X)
    n = x.shape[0]
    prompt_tokens = _batch_vector("prompt_tokens", prompt_tokens, n, hi=MAX_PROMPT_TOKENS)
    if not bool(np.asarray(state.active).any()):
        raise ValueError("state has no active arm to route to")
    check_policy(policy)
    if policy.stochastic and key is None:
        raise ValueError(f"a stochastic policy (explore={policy.explore!r}, temperature "
                         f"{float(policy.temperature):g}, epsilon {float(policy.epsilon):g}) needs a PRNG key: "
                         "pass key=jax.random.PRNGKey(seed) (split it per call)")
    if key is not None:
        key = jnp.asarray(key)
        if key.shape != (2,) or key.dtype != jnp.uint32:
            raise ValueError(f"key must be a jax.random.PRNGKey (uint32 [2]), got {key.dtype} {key.shape}")
    if bonus is not None:
        bonus = _finite_matrix("bonus", bonus, (state.capacity,), MAX_ABS_TARGET)
        if bonus.shape[0] != n:
            raise ValueError(f"bonus has {bonus.shape[0]} rows but x has {n}")
    return x, prompt_tokens, bonus, key


DECISION_ROWS = ("arm", "quality", "tokens", "cost", "uncertainty", "wait", "penalty", "score", "propensity",
                 "bonus", "eligible")


def route(state: RouterState, x, prompt_tokens, policy: Policy, bonus=None, key=None) -> Decision:
    """Checked, bucketed `route_batch`: x [B, d], prompt_tokens [B] -> Decision sliced to B rows.

    key: a jax.random key, required when the policy is stochastic (Thompson sampling, a softmax
    temperature > 0 or epsilon > 0); split it for every call, or the draws repeat.
    """
    x, prompt_tokens, bonus, key = check_route(state, x, prompt_tokens, policy, bonus, key)
    n = x.shape[0]
    size = bucket(n)
    if bonus is not None:
        bonus = jnp.asarray(pad_rows(bonus, size))
    book = np.arange(size) < n  # padding rows book no load
    d = route_batch(state, jnp.asarray(pad_rows(x, size)), jnp.asarray(pad_rows(prompt_tokens, size)),
                    policy, jnp.asarray(book), bonus, key)
    return d.replace(**{k: getattr(d, k)[:n] for k in DECISION_ROWS})


def check_update(state: RouterState, x, arm, targets, weight=None):
    """The checks of `update`: (x [B, d], arm [B] int32, targets [B, T], weight [B]) as clean
    arrays, or a ValueError naming the field and value. Also used by mesh.update."""
    x = _finite_matrix("x", x, (state.dim,), MAX_ABS_X)
    n = x.shape[0]
    targets = _finite_matrix("targets", targets, (state.n_targets,), MAX_ABS_TARGET)
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} rows but x has {n}")
    try:
        arm_arr = np.asarray(arm)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"arm must be an integer array of shape ({n},)") from None
    if arm_arr.shape != (n,) or not np.issubdtype(arm_arr.dtype, np.integer):
        raise ValueError(f"arm must be an integer array of shape ({n},), got {arm_arr.dtype} {arm_arr.shape}")
    active = np.asarray(state.active)
    bad = np.flatnonzero((arm_arr < 0) | (arm_arr >= state.capacity))
    if bad.size:
        raise ValueError(f"arm must be in [0, {state.capacity}), got {arm_arr[bad[0]]} at index {bad[0]}")
    bad = np.flatnonzero(~active[arm_arr])
    if bad.size:
        raise ValueError(f"arm {arm_arr[bad[0]]} (index {bad[0]}) is not an active arm")
    w = np.ones(n, np.float32) if weight is None else _batch_vector("weight", weight, n, hi=MAX_WEIGHT)
    return x, arm_arr.astype(np.int32), targets, w


def update(state: RouterState, x, arm, targets, weight=None) -> RouterState:
    """Checked, bucketed `update_batch`: x [B, d], arm [B] (active slots), targets [B, T], weight [B]."""
    x, arm, targets, w = check_update(state, x, arm, targets, weight)
    size = bucket(x.shape[0])
    return bandit.update_batch(state, jnp.asarray(pad_rows(x, size)), jnp.asarray(pad_rows(arm, size)),
                               jnp.asarray(pad_rows(targets, size)), jnp.asarray(pad_rows(w, size)))

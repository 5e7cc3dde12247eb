"""Load model: each arm serves up to max_concurrency requests at once, first come first served.

The load state is `free_at` [K, C]: when each of an arm's C serving slots frees (slots past the
arm's max_concurrency are +inf). A new request on arm k waits until its earliest slot frees; it then
takes ttft_k + n / tokens_per_s_k seconds for n completion tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_EXPONENT = 30.0  # caps exp() in the penalty so extreme waits stay finite

# The latency profile of an LLM whose figures are not given (models file, POST /v1/models, add_arm).
DEFAULT_TTFT_S = 0.5  # seconds to first token
DEFAULT_TOKENS_PER_S = 50.0  # decode speed
DEFAULT_MAX_CONCURRENCY = 8  # requests served at once


def service_time(ttft, tokens_per_s, n_tokens):
    """Seconds to serve n_tokens: broadcasts ttft [K], tokens_per_s [K] against n_tokens [..., K]."""
    return ttft + n_tokens / tokens_per_s


def wait(free_at, clock):
    """Predicted wait of a request arriving at `clock` on each arm: free_at [K, C] -> [K]."""
    return jnp.maximum(free_at.min(axis=-1) - clock, 0.0)


def penalty(wait_s, tau):
    """0 up to the tolerance tau, then exp((wait - tau) / tau) - 1 (continuous at tau)."""
    tau = jnp.maximum(tau, 1e-6)
    z = jnp.minimum((wait_s - tau) / tau, MAX_EXPONENT)
    return jnp.where(wait_s > tau, jnp.expm1(z), 0.0)


def occupy(free_at, clock, arm, duration):
    """Book `duration` s on arm `arm`'s earliest-free slot: free_at [K, C] -> [K, C]."""
    row = free_at[arm]
    c = jnp.argmin(row)
    return free_at.at[arm, c].set(jnp.maximum(row[c], clock) + duration)


def assign_sequential(base_score, service, free_at, clock, beta, tau, book, pick=None, per_row=None):
    """Assign queries one after another, each seeing the load of those before it.

    base_score [B, K] (already -inf for inactive arms), service [B, K] s, free_at [K, C],
    book [B] bool (padding rows book nothing). pick(score [K], row inputs) -> (arm, propensity)
    chooses on the penalised score (default: argmax, propensity 1); per_row is a pytree of [B, ...]
    arrays handed to `pick` row by row (e.g. random draws). Returns (arm [B], wait [B, K],
    penalty [B, K], score [B, K], free_at [K, C], propensity [B]). A `lax.scan`: it stays inside
    the caller's jitted computation.
    """
    if pick is None:
        pick = lambda score, _: (jnp.argmax(score), jnp.ones((), score.dtype))  # noqa: E731

    def step(load, inp):
        s, t, ok, row = inp
        w = wait(load, clock)
        pen = penalty(w, tau)
        score = s - beta * pen
        a, p = pick(score, row)
        load = jnp.where(ok, occupy(load, clock, a, t[a]), load)
        return load, (a, w, pen, score, p)

    free_at, (arm, w, pen, score, prop) = jax.lax.scan(step, free_at, (base_score, service, book, per_row))
    return arm, w, pen, score, free_at, prop

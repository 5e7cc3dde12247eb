"""The meta-decision: score every arm for every query and pick one, in one jitted computation.

score_k = q_k - lambda * c_k + alpha * u_k - beta * pen_k   (inactive arms: -inf)

q_k predicted quality, c_k = prompt_tokens * price_in_k + n_k * price_out_k the predicted cost in
USD with n_k = exp(predicted log completion tokens), u_k = sqrt(x^T A_inv_k x) the LinUCB width and
pen_k the latency penalty of the arm's predicted wait (see latency.py). lambda is the policy's
cost_weight, or for a share `mix` of queries its mix_cost_weight: a randomised mixture of two
operating points that meets a budget between them (budget.py). Which queries take the mixture is
decided by a hash of the query's features, so the same query always gets the same decision.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mixllm_jax import bandit, latency
from mixllm_jax.state import LOG_TOKENS, QUALITY, RouterState

MAX_LOG_TOKENS = 12.0  # exp(12) ~ 160k tokens: caps a wild length extrapolation


@flax.struct.dataclass
class Policy:
    """The decision's knobs. Numbers are traced (changing them never recompiles).

    cost_weight: lambda, quality traded per USD.  alpha: LinUCB exploration weight (in posterior
      s.d. of the predicted quality).  beta: latency-penalty weight.  tau: wait tolerance (s)
      before the penalty starts.  mix_cost_weight, mix: a share `mix` of the queries (by feature
      hash) is scored with mix_cost_weight instead of cost_weight.
    in_batch_load: static; when True each query of a batch sees the load booked by the queries
      before it (a lax.scan), so a batch does not herd onto one LLM.
    """

    cost_weight: float = 0.0
    alpha: float = 0.01
    beta: float = 0.1
    tau: float = 30.0
    mix_cost_weight: float = 0.0
    mix: float = 0.0
    in_batch_load: bool = flax.struct.field(pytree_node=False, default=True)


@flax.struct.dataclass
class Decision:
    """Per-query choice and its explanation. B queries, K arm slots, C load slots.

    arm [B] int32; quality, tokens, cost (USD), uncertainty, wait (s), penalty, score: [B, K];
    free_at [K, C]: the load after booking this batch (commit it with `commit_load`).
    """

    arm: jnp.ndarray
    quality: jnp.ndarray
    tokens: jnp.ndarray
    cost: jnp.ndarray
    uncertainty: jnp.ndarray
    wait: jnp.ndarray
    penalty: jnp.ndarray
    score: jnp.ndarray
    free_at: jnp.ndarray


_HASH_MULT = 0x9E3779B1  # odd multipliers per feature: golden-ratio sequence


def query_uniform(x: jnp.ndarray) -> jnp.ndarray:
    """A deterministic uniform number in [0, 1) per query from its features' bits: x [B, d] -> [B]."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    mult = (jnp.arange(x.shape[1], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(_HASH_MULT)
    h = (bits * mult).sum(axis=1, dtype=jnp.uint32)
    for shift, m in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3 finaliser
        h = (h ^ (h >> shift)) * jnp.uint32(m)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def cost_weights(policy: Policy, x: jnp.ndarray) -> jnp.ndarray:
    """Each query's lambda under the policy's mixture: [B]."""
    return jnp.where(query_uniform(x) < policy.mix, policy.mix_cost_weight, policy.cost_weight)


def predict_cost(prompt_tokens, tokens, price_in, price_out):
    """Predicted cost in USD: prompt_tokens [B], tokens [B, K], price_in/price_out [K] (USD per
    token) -> [B, K]. The one cost formula (routing, serving and the explanation all use it)."""
    return prompt_tokens[:, None] * price_in + tokens * price_out


@jax.jit
def route_batch(state: RouterState, x: jnp.ndarray, prompt_tokens: jnp.ndarray, policy: Policy,
                book: jnp.ndarray | None = None, bonus: jnp.ndarray | None = None) -> Decision:
    """Choose an arm for each query of x [B, d] with prompt_tokens [B].

    Unchecked and jit-compiled: one compile per (B, d, K) shape; `engine.route` is the checked
    entry point that pads B to a bucket. book [B] bool marks real rows (padding books no load);
    bonus [B, K] is an extra additive score term (the binary-feedback network's).
    """
    n = x.shape[0]
    book = jnp.ones((n,), bool) if book is None else book
    y_hat, width = bandit.predict(state, x)
    quality = y_hat[..., QUALITY]
    tokens = jnp.exp(jnp.clip(y_hat[..., LOG_TOKENS], 0.0, MAX_LOG_TOKENS))
    cost = predict_cost(prompt_tokens, tokens, state.price_in, state.price_out)
    base = quality - cost_weights(policy, x)[:, None] * cost + policy.alpha * width
    if bonus is not None:
        base = base + bonus
    base = jnp.where(state.active, base, -jnp.inf)
    service = latency.service_time(state.ttft, state.tokens_per_s, tokens)

    if policy.in_batch_load:
        arm, wait, pen, score, free_at = latency.assign_sequential(
            base, service, state.free_at, state.clock, policy.beta, policy.tau, book)
    else:
        wait = jnp.broadcast_to(latency.wait(state.free_at, state.clock), base.shape)
        pen = latency.penalty(wait, policy.tau)
        score = base - policy.beta * pen
        arm = jnp.argmax(score, axis=1)
        free_at = state.free_at
    return Decision(arm=arm.astype(jnp.int32), quality=quality, tokens=tokens, cost=cost,
                    uncertainty=width, wait=wait, penalty=pen, score=score, free_at=free_at)


def commit_load(state: RouterState, decision: Decision) -> RouterState:
    """Commit a decision's booked load to the state."""
    return state.replace(free_at=decision.free_at)


def advance_clock(state: RouterState, now: float) -> RouterState:
    """Move the state's clock (s) to `now`; queries routed next arrive then."""
    return state.replace(clock=jnp.asarray(now, jnp.float32))

"""The meta-decision: score every arm for every query and pick one, in one jitted computation.

score_k = sum of the score terms (`TERMS`: quality_k - lambda * c_k + alpha * u_k) + bonus_k
          - beta * pen_k;   arms that are inactive or not eligible (`Constraints`): -inf

q_k predicted quality (clipped to the targets' range [0, 1]), c_k = prompt_tokens * price_in_k +
n_k * price_out_k the predicted cost in USD with n_k = exp(predicted log completion tokens)
(`predict_arms`, the one prediction of quality, length and cost), u_k = noise_k * sqrt(x^T A_inv_k x) the posterior s.d. of q_k
(bandit.predict), bonus_k an extra additive term (the binary-feedback network's) and pen_k the
latency penalty of the arm's predicted wait (latency.py; applied in `choose`, query by query,
because it depends on the load the batch's earlier queries booked). lambda is the policy's
cost_weight, or for a share `mix` of queries its mix_cost_weight: a randomised mixture of two
operating points that meets a budget between them (budget.py). Which queries take the mixture is
decided by a hash of the query's features, so the same query always gets the same decision.
Policy numbers may be scalars or [B] arrays (per-request operating points).

The score terms compose the way optax composes gradient transformations: each is a function
(ArmPredictions, x, policy) -> [B, K] and `TERMS` is their tuple; a new term is one function and
one entry.

Exploration (`Policy.explore`, static): "ucb" adds alpha * u_k (alpha in posterior s.d.s);
"thompson" adds alpha * u_k * z_k with z_k ~ N(0, 1) drawn per (query, arm), i.e. q_k is replaced
by a draw from its posterior N(q_k, (alpha u_k)^2) (alpha = 1: the posterior itself); "greedy"
adds nothing. On top of any of them, `temperature` > 0 samples the arm from softmax(score / T)
(Gumbel-max) and `epsilon` > 0 sends a share epsilon of the queries to a uniformly random eligible
arm. Every Decision carries the probability the policy had of choosing the arm it chose (its
propensity, see `Decision`), which off-policy evaluation (ope.py) and the on-policy feedback
network (feedback_net.py) use. Random draws come from the `key` argument. See
docs/architecture.md, "Decision" and "Online learning".
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mixllm_jax.core import bandit, latency
from mixllm_jax.core.state import LOG_TOKENS, QUALITY, RouterState

MAX_LOG_TOKENS = 12.0  # exp(12) ~ 160k tokens: caps a wild length extrapolation
QUALITY_MIN, QUALITY_MAX = 0.0, 1.0  # the range of quality targets (data/schema): predictions are clipped to it
EXPLORE_MODES = ("ucb", "thompson", "greedy")
PROPENSITY_SAMPLES = 128  # Monte Carlo draws of a Thompson decision's propensity


@flax.struct.dataclass
class Policy:
    """The decision's knobs. Numbers are traced (changing them never recompiles).

    cost_weight: lambda, quality traded per USD.  alpha: exploration weight in posterior s.d.s of
      the predicted quality (UCB bonus alpha * u; Thompson draw s.d. alpha * u).  beta:
      latency-penalty weight.  tau: wait tolerance (s) before the penalty starts.
      mix_cost_weight, mix: a share `mix` of the queries (by feature hash) is scored with
      mix_cost_weight instead of cost_weight.
    temperature: > 0 samples the arm from softmax(score / temperature) (0: the best score).
    epsilon: the share of queries sent to a uniformly random eligible arm (epsilon-mixing).
    explore: static; "ucb" | "thompson" | "greedy" (see the module docstring).
    in_batch_load: static; when True each query of a batch sees the load booked by the queries
      before it (a lax.scan), so a batch does not herd onto one LLM.
    """

    cost_weight: float = 0.0
    alpha: float = 0.01
    beta: float = 0.1
    tau: float = 30.0
    mix_cost_weight: float = 0.0
    mix: float = 0.0
    temperature: float = 0.0
    epsilon: float = 0.0
    explore: str = flax.struct.field(pytree_node=False, default="ucb")
    in_batch_load: bool = flax.struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        if self.explore not in EXPLORE_MODES:
            raise ValueError(f"explore must be one of {EXPLORE_MODES}, got {self.explore!r}")

    @property
    def stochastic(self) -> bool:
        """Whether decisions are random draws (they need a PRNG key). Host-side: reads the numbers."""
        return self.explore == "thompson" or float(self.temperature) > 0 or float(self.epsilon) > 0


@flax.struct.dataclass
class Decision:
    """Per-query choice and its explanation. B queries, K arm slots, C load slots.

    arm [B] int32; quality, tokens, cost (USD), uncertainty, wait (s), penalty, score: [B, K];
    free_at [K, C]: the load after booking this batch (commit it with `commit_load`).
    propensity [B]: the probability the policy had of choosing `arm` (given the state and, with
      in-batch load, the load booked before the query): 1 for a deterministic policy; exact for
      softmax / epsilon-mixing; for Thompson sampling a Monte Carlo estimate from
      PROPENSITY_SAMPLES fresh draws (at least 1 / PROPENSITY_SAMPLES).
    score: the score the choice was made on (for Thompson, with the posterior draw in it).
    bonus [B, K]: the extra score term (0 without one).  eligible [B, K] bool: the arms the query
      could be sent to (active, allowed, within its context window and cost cap).
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
    propensity: jnp.ndarray
    bonus: jnp.ndarray
    eligible: jnp.ndarray


@flax.struct.dataclass
class Constraints:
    """What each query may be sent to. B queries, K arm slots.

    allowed [B, K] bool: the request's candidate LLMs.  max_cost [B]: a cap on the predicted cost in
    USD (+inf: none).  context_window [K]: tokens (+inf: unknown).
    An arm is a candidate when active, allowed and its context window holds the prompt plus the
    predicted answer; a candidate is eligible when its predicted cost is within max_cost -- or it is
    the cheapest candidate, so a too-small cap still gets the cheapest LLM. All fields are traced:
    new caps, masks or windows never recompile.
    """

    allowed: jnp.ndarray
    max_cost: jnp.ndarray
    context_window: jnp.ndarray

    @classmethod
    def none(cls, batch: int, capacity: int) -> "Constraints":
        """No constraint beyond the arms being active."""
        return cls(allowed=jnp.ones((batch, capacity), bool), max_cost=jnp.full((batch,), jnp.inf, jnp.float32),
                   context_window=jnp.full((capacity,), jnp.inf, jnp.float32))


@flax.struct.dataclass
class ArmPredictions:
    """Every arm's predictions for every query, [B, K]: quality, completion tokens, cost (USD) and
    the posterior s.d. of the quality (width)."""

    quality: jnp.ndarray
    tokens: jnp.ndarray
    cost: jnp.ndarray
    width: jnp.ndarray


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


def choice_probs(score: jnp.ndarray, temperature) -> jnp.ndarray:
    """The policy's choice distribution over arms on scores [..., K] (-inf: not eligible), before
    epsilon-mixing: one-hot of the best score (temperature 0) or softmax(score / temperature)."""
    hard = jax.nn.one_hot(jnp.argmax(score, axis=-1), score.shape[-1], dtype=jnp.float32)
    soft = jax.nn.softmax(score / jnp.maximum(temperature, 1e-12), axis=-1)
    return jnp.where(temperature > 0, soft, hard)


def _picker(policy: Policy, n: int, K: int, sd: jnp.ndarray, key):
    """(pick, per-row draws) for `latency.assign_sequential`: pick(score [K], row) -> (arm, propensity).

    The draws: Gumbel noise for the softmax, the epsilon coin and the uniform arm, the Thompson
    draw of every arm's quality (s.d. sd [B, K]) and a key for the propensity's Monte Carlo draws.
    """
    thompson = policy.explore == "thompson"
    k_draw, k_gumbel, k_eps, k_uni, k_mc = jax.random.split(key, 5)
    draw = sd * jax.random.normal(k_draw, (n, K)) if thompson else jnp.zeros((n, K), jnp.float32)
    rows = (jax.random.gumbel(k_gumbel, (n, K)), jax.random.uniform(k_eps, (n,)),
            jax.random.gumbel(k_uni, (n, K)), draw, sd, jax.random.split(k_mc, n))
    T, eps = policy.temperature, policy.epsilon

    def pick(score, row):
        g, u, g2, dr, sdr, kr = row
        eligible = jnp.isfinite(score)
        s = score + dr
        a_main = jnp.argmax(jnp.where(eligible, s + T * g, -jnp.inf))
        a_rand = jnp.argmax(jnp.where(eligible, g2, -jnp.inf))
        a = jnp.where(u < eps, a_rand, a_main)
        if thompson:  # P(a is chosen) over fresh posterior draws
            z = jax.random.normal(kr, (PROPENSITY_SAMPLES, K))
            p_main = jnp.maximum(choice_probs(score[None] + sdr * z, T).mean(0)[a], 1.0 / PROPENSITY_SAMPLES)
        else:
            p_main = choice_probs(s, T)[a]
        p = (1.0 - eps) * p_main + eps * eligible[a] / jnp.maximum(eligible.sum(), 1)
        return a, p

    return pick, rows, draw


@jax.jit
def route_batch(state: RouterState, x: jnp.ndarray, prompt_tokens: jnp.ndarray, policy: Policy,
                book: jnp.ndarray | None = None, bonus: jnp.ndarray | None = None,
                key: jnp.ndarray | None = None, constraints: Constraints | None = None) -> Decision:
    """Choose an arm for each query of x [B, d] with prompt_tokens [B].

    Unchecked and jit-compiled: one compile per (B, d, K) shape and exploration mode;
    `engine.route` is the checked entry point that pads B to a bucket (and requires a key for a
    stochastic policy). book [B] bool marks real rows (padding books no load); bonus [B, K] is an
    extra additive score term (the binary-feedback network's); key: a jax.random key for the
    policy's draws (None: a fixed key 0, so a stochastic policy repeats its draws); constraints:
    what each query may be sent to (None: every active arm).
    """
    book = jnp.ones((x.shape[0],), bool) if book is None else book
    d = choose(state, *score_terms(state, x, prompt_tokens, policy, bonus, constraints), policy, book, key)
    return d if bonus is None else d.replace(bonus=bonus)


def predict_arms(state: RouterState, x, prompt_tokens) -> ArmPredictions:
    """The one prediction of every arm's quality, length and cost: x [B, d], prompt_tokens [B].

    Each is clipped to its target's range: quality to [QUALITY_MIN, QUALITY_MAX] = [0, 1] (the
    logs' scores; a linear predictor extrapolates past them), log completion tokens to
    [0, MAX_LOG_TOKENS]. Learning (bandit.split, update_batch) uses the unclipped linear
    predictions; scores, explanations and decisions use these.
    """
    y_hat, width = bandit.predict(state, x)
    quality = jnp.clip(y_hat[..., QUALITY], QUALITY_MIN, QUALITY_MAX)
    tokens = jnp.exp(jnp.clip(y_hat[..., LOG_TOKENS], 0.0, MAX_LOG_TOKENS))
    cost = predict_cost(prompt_tokens, tokens, state.price_in, state.price_out)
    return ArmPredictions(quality=quality, tokens=tokens, cost=cost, width=width)


def quality_term(p: ArmPredictions, x, policy: Policy):
    """q_k: the predicted quality."""
    return p.quality


def cost_term(p: ArmPredictions, x, policy: Policy):
    """-lambda c_k, with each query's lambda under the policy's mixture."""
    return -cost_weights(policy, x)[:, None] * p.cost


def exploration_term(p: ArmPredictions, x, policy: Policy):
    """alpha u_k for UCB (optimism in posterior s.d.s); Thompson's draw is added in `choose`."""
    return policy.alpha * p.width if policy.explore == "ucb" else jnp.zeros_like(p.width)


TERMS = (quality_term, cost_term, exploration_term)


def eligible(state: RouterState, p: ArmPredictions, prompt_tokens, constraints: Constraints | None) -> jnp.ndarray:
    """[B, K] bool: the arms each query may be sent to (see `Constraints`)."""
    if constraints is None:
        return jnp.broadcast_to(state.active, p.cost.shape)
    fits = prompt_tokens[:, None] + p.tokens <= constraints.context_window[None, :]
    ok = constraints.allowed & state.active & fits
    cheapest = jnp.min(jnp.where(ok, p.cost, jnp.inf), axis=1, keepdims=True)
    return ok & (p.cost <= jnp.maximum(constraints.max_cost[:, None], cheapest))


def score_terms(state: RouterState, x, prompt_tokens, policy: Policy, bonus=None, constraints=None):
    """The per-(query, arm) terms of route_batch: (quality, tokens, cost, width, base), each [B, K].

    base = the sum of `TERMS` (+ bonus), -inf where the arm is not eligible. Every entry depends on
    its own query and arm only, so a mesh computes it block by block (mesh.py).
    """
    p = predict_arms(state, x, prompt_tokens)
    base = sum(term(p, x, policy) for term in TERMS)
    if bonus is not None:
        base = base + bonus
    ok = eligible(state, p, prompt_tokens, constraints)
    return p.quality, p.tokens, p.cost, p.width, jnp.where(ok, base, -jnp.inf)


def choose(state: RouterState, quality, tokens, cost, width, base, policy: Policy, book, key) -> Decision:
    """route_batch's last step: the Decision from the score terms [B, K] (base: quality - lambda
    cost, the UCB bonus and the extra bonus, -inf on inactive arms): latency penalty, exploration
    draws, the choice and its propensity. Shared with the sharded route (mesh.py), which computes
    the terms block by block and calls this on them."""
    n, K = base.shape
    service = latency.service_time(state.ttft, state.tokens_per_s, tokens)
    pick, rows, draw = _picker(policy, n, K, policy.alpha * width,
                               jax.random.PRNGKey(0) if key is None else key)

    if policy.in_batch_load:
        arm, wait, pen, score, free_at, prop = latency.assign_sequential(
            base, service, state.free_at, state.clock, policy.beta, policy.tau, book, pick, rows)
    else:
        wait = jnp.broadcast_to(latency.wait(state.free_at, state.clock), base.shape)
        pen = latency.penalty(wait, policy.tau)
        score = base - policy.beta * pen
        arm, prop = jax.vmap(pick)(score, rows)
        free_at = state.free_at
    return Decision(arm=arm.astype(jnp.int32), quality=quality, tokens=tokens, cost=cost,
                    uncertainty=width, wait=wait, penalty=pen, score=score + draw, free_at=free_at,
                    propensity=prop.astype(jnp.float32), bonus=jnp.zeros_like(base),
                    eligible=jnp.isfinite(base))


def commit_load(state: RouterState, decision: Decision) -> RouterState:
    """Commit a decision's booked load to the state."""
    return state.replace(free_at=decision.free_at)


def advance_clock(state: RouterState, now: float) -> RouterState:
    """Move the state's clock (s) to `now`; queries routed next arrive then."""
    return state.replace(clock=jnp.asarray(now, jnp.float32))

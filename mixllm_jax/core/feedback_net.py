"""Binary feedback: the dynamic feedback score f_df (MixLLM's "dynamic feedback", see docs/architecture.md).

Where only satisfied / not satisfied is observed, a small MLP (3 layers) maps the query features
x [B, d] to a per-arm score term [B, K] that is added to the decision's score (`route_batch`'s
`bonus`). It is trained by policy gradient (REINFORCE with a running-mean baseline) on the reward,
through optax (Adam, lr 1e-3), and every step is scaled by a confidence weight

    kappa = 1 / (1 + var / NOISE_REF)        var: running variance of the recent rewards

so noisy feedback moves the network less. Pure functions over a `FeedbackState` NamedTuple.

On-policy (docs/architecture.md, "Online learning"): the decisions that feed the network are drawn
from a stochastic policy, softmax((s_k + f_k(x)) / T) over the eligible arms (possibly
epsilon-mixed), where s_k is the rest of the decision's score (quality, cost, exploration,
latency) and f the network. `update` with `score` and `temperature` differentiates exactly that
policy's log-probability of the logged arm, and with `propensity` (the probability the decision
was drawn with, `policy.Decision.propensity`) weights each term by the importance ratio
pi_current(a | x) / propensity (clipped at MAX_RATIO; ~1 when the update follows the decision, a
correction when it replays a log gathered under another policy):

    loss = -mean( kappa * (r - baseline) * stop_gradient(ratio) * log pi(a | x) )
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

NOISE_REF = 0.05  # reward variance at which kappa = 1/2
MAX_RATIO = 5.0  # clip of the importance ratio pi_current / propensity
EMA = 0.05  # weight of a new batch in the running reward mean / variance


class FeedbackNet(nn.Module):
    """x [B, d] -> per-arm score term [B, K] in [-scale, scale]."""

    capacity: int
    hidden: int = 64
    scale: float = 0.1

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden)(x))
        h = nn.relu(nn.Dense(self.hidden)(h))
        return self.scale * jnp.tanh(nn.Dense(self.capacity, kernel_init=nn.initializers.zeros)(h))


class FeedbackState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    reward_mean: jnp.ndarray  # [] running mean of rewards (the baseline)
    reward_var: jnp.ndarray  # [] running variance of rewards
    count: jnp.ndarray  # [] rewards seen


def _optimizer(learning_rate: float = 1e-3):
    return optax.adam(learning_rate)


def init_feedback(dim: int, capacity: int, seed: int = 0, hidden: int = 64) -> FeedbackState:
    """A fresh network (scoring 0 for every arm until it has learned something)."""
    params = FeedbackNet(capacity, hidden).init(jax.random.PRNGKey(seed), jnp.zeros((1, dim)))["params"]
    return FeedbackState(params, _optimizer().init(params), jnp.asarray(0.5), jnp.asarray(0.25), jnp.asarray(0.0))


def _net(params) -> FeedbackNet:
    """The network whose parameters these are (its sizes read from their shapes)."""
    return FeedbackNet(capacity=params["Dense_2"]["kernel"].shape[1], hidden=params["Dense_0"]["kernel"].shape[1])


def apply_params(params, x) -> jnp.ndarray:
    """The network's score term of every arm from its parameters: x [B, d] -> [B, K]."""
    return _net(params).apply({"params": params}, x)


@jax.jit
def bonus(fs: FeedbackState, x) -> jnp.ndarray:
    """The score term of every arm: x [B, d] -> [B, K]."""
    return apply_params(fs.params, x)


def kappa(fs: FeedbackState) -> jnp.ndarray:
    """Confidence weight in (0, 1]: low when recent rewards are noisy."""
    return 1.0 / (1.0 + fs.reward_var / NOISE_REF)


@jax.jit
def update(fs: FeedbackState, x, arm, reward, active, valid=None, score=None, propensity=None,
           temperature=1.0) -> FeedbackState:
    """One policy-gradient step on binary rewards: x [B, d], arm [B] chosen, reward [B] in {0, 1},
    active [K] bool, valid [B] masks padding rows.

    score [B, K]: the rest of each decision's score (without the network's term; -inf for arms
      that were not eligible); the policy is then softmax((score + f(x)) / temperature). Without
      it the policy is softmax(f(x)) over the active arms.
    propensity [B]: the probability each logged decision was drawn with; weights every term by
      pi_current(arm) / propensity (clipped at MAX_RATIO). None: on-policy, ratio 1.
    """
    valid = jnp.ones(reward.shape, bool) if valid is None else valid
    w = valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    batch_mean = (w * reward).sum() / n
    ema = jnp.where(w.sum() > 0, EMA, 0.0)
    mean = (1 - ema) * fs.reward_mean + ema * batch_mean
    var = (1 - ema) * fs.reward_var + ema * (w * (reward - fs.reward_mean) ** 2).sum() / n
    fs = fs._replace(reward_mean=mean, reward_var=var, count=fs.count + w.sum())
    advantage = (reward - fs.reward_mean) * kappa(fs)
    T = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)

    def logp(params):
        f = _net(fs.params).apply({"params": params}, x)
        if score is None:
            logits = jnp.where(active, f, -jnp.inf)
        else:
            logits = jnp.where(active & jnp.isfinite(score), (jnp.where(jnp.isfinite(score), score, 0.0) + f) / T,
                               -jnp.inf)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), arm[:, None], axis=1)[:, 0]

    if propensity is None:
        ratio = jnp.ones_like(reward)
    else:
        ratio = jnp.clip(jnp.exp(logp(fs.params)) / jnp.maximum(propensity, 1e-6), 0.0, MAX_RATIO)
    ratio = jnp.where(valid, ratio, 0.0)

    def loss(params):
        return -(w * advantage * jax.lax.stop_gradient(ratio) * logp(params)).sum() / n

    grads = jax.grad(loss)(fs.params)
    upd, opt_state = _optimizer().update(grads, fs.opt_state, fs.params)
    return fs._replace(params=optax.apply_updates(fs.params, upd), opt_state=opt_state)

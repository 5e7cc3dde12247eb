"""The router: encoder + tag-enhanced head + bandit state + LLM registry + policy.

`route_text_batch` runs token ids -> encoder -> head -> route_batch as one jitted computation.
`Router` is the host-side object users hold: `Router.route(texts)` returns one `Route` per text.
Checkpoints of a Router: `mixllm_jax.store.checkpoint` (Orbax).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixllm_jax.text import encoder as enc_mod, tags, tokens
from mixllm_jax.core.budget import OperatingCurve
from mixllm_jax.core.config import RouterConfig
from mixllm_jax.core import feedback_net
from mixllm_jax.core.policy import Constraints, Decision, Policy, commit_load, route_batch
from mixllm_jax.core.state import ArmRegistry, RouterState, with_bias

DOMAIN_SCALE = 3.0  # size of the domain one-hot beside the unit-norm embedding
SOFT_DOMAIN_TEMPERATURE = 20.0  # soft membership = softmax(T * cosine to each domain centroid)


def featurize(e, head_params, centroids, *, head_shape, mode: str):
    """Bandit features of encoder embeddings e [N, H]: (x [N, d], nearest domain [N] or None).

    mode "raw+domain" (default): [e, DOMAIN_SCALE * one-hot of the nearest domain centroid, 1] -- the
      tag-enhanced embedding: per-domain intercepts plus the per-query embedding;
    "soft-domain": [e, DOMAIN_SCALE * softmax(T * cosine to each centroid), 1];
    "head": [tag-head features z, 1] (neural-linear);  "raw": [e, 1].
    head_shape = (hidden, features), or None when there is no head (then mode must be "raw").
    The first columns are shrunk by the ridge, the domain intercepts by their own precision
    (`feature_groups`, fit.prior_grid).
    """
    if head_shape is None:
        return with_bias(e), None
    # domains live in the embedding space (centroids [G, H], tags.TrainedHead); a zero centroid is an
    # unopened spare domain (domains.py): never the nearest
    cos = jnp.where(jnp.linalg.norm(centroids, axis=1) > 0, tags.unit(e) @ tags.unit(centroids).T, -jnp.inf)
    domain = jnp.argmax(cos, axis=1)
    if mode == "head":
        f = tags.TagHead(*head_shape).apply({"params": head_params}, e)
    elif mode == "raw":
        f = e
    elif mode == "soft-domain":
        f = jnp.concatenate([e, DOMAIN_SCALE * jax.nn.softmax(SOFT_DOMAIN_TEMPERATURE * cos, axis=1)], -1)
    else:
        f = jnp.concatenate([e, DOMAIN_SCALE * jax.nn.one_hot(domain, centroids.shape[0], dtype=e.dtype)], -1)
    return with_bias(f), domain


def feature_groups(mode: str, embedding_dim: int, head_features: int | None, dim: int,
                   spare_domains: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([dim] bool, [dim] bool): the features the ridge shrinks (embedding or head features) and the
    trained domains' intercepts (fit.prior_grid gives them their own precision; the bias and the
    spare domains' columns, unobserved offline, keep a tiny one)."""
    n = head_features if mode == "head" else embedding_dim
    i = np.arange(dim)
    domain = (i >= n) & (i < dim - 1 - spare_domains) if mode in ("raw+domain", "soft-domain") else np.zeros(dim, bool)
    return i < n, domain


@functools.partial(jax.jit, static_argnames=("enc_config", "head_shape", "mode"))
def route_text_batch(enc_params, head_params, centroids, state: RouterState, ids, mask, prompt_tokens,
                     policy: Policy, book=None, key=None, constraints: Constraints | None = None,
                     feedback_params=None, *, enc_config, head_shape, mode):
    """The one text -> decision computation: ids, mask [B, L] -> encoder -> head -> features x ->
    route_batch, fused into one compiled program. `Router.decide`, the CLI and the server call it.

    prompt_tokens [B]; policy: its numbers may be [B] arrays (per-request operating points);
    book [B] bool: rows that book load (None: all); key: the policy's PRNG key (required when it is
    stochastic); constraints: what each query may be sent to (policy.Constraints; None: every
    active arm); feedback_params: the binary-feedback network's parameters, whose output is added
    as a score term (None: no such term). Returns (Decision, nearest training domain [B] or None,
    x [B, d] -- the features an observation of this decision is recorded with).
    """
    e = enc_mod.embed_ids(enc_params, enc_config, ids, mask)
    x, domain = featurize(e, head_params, centroids, head_shape=head_shape, mode=mode)
    bonus = None if feedback_params is None else feedback_net.apply_params(feedback_params, x)
    return route_batch(state, x, prompt_tokens, policy, book, bonus, key, constraints), domain, x


_featurize_jit = jax.jit(featurize, static_argnames=("head_shape", "mode"))


@dataclasses.dataclass
class Route:
    """One routing decision, explained: per-LLM predictions keyed by name."""

    model: str
    quality: dict[str, float]
    cost: dict[str, float]
    uncertainty: dict[str, float]
    penalty: dict[str, float]
    score: dict[str, float]
    domain: str | None = None


@dataclasses.dataclass
class Router:
    """Everything needed to route text. `encoder` may be None for feature-only use."""

    encoder: enc_mod.Encoder | None
    head: tags.TrainedHead | None
    state: RouterState
    registry: ArmRegistry
    policy: Policy = Policy()
    config: RouterConfig = RouterConfig()
    curve: OperatingCurve | None = None  # held-out cost-quality curve: budgets -> policies

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def truncation_side(self) -> str:
        return self.config.truncation_side

    @property
    def feature_mode(self) -> str:
        return self.config.features

    def policy_for(self, budget, base: Policy | None = None) -> Policy:
        """`base` (default: the router's policy) moved to the operating point of a config.Budget:
        the one Budget -> Policy conversion of the CLI, the evaluation and the server. A cost-weight
        budget needs no curve; a share or USD budget is met on the held-out curve."""
        base = self.policy if base is None else base
        if budget.kind == "cost_weight":
            return base.replace(cost_weight=float(budget.value), mix_cost_weight=0.0, mix=0.0)
        if self.curve is None:
            raise ValueError(f"this router has no operating curve: a budget of {budget.describe()} needs "
                             f"cross-fitting to calibrate on (train with folds >= 2); give a cost weight instead")
        return self.curve.policy(budget, base)

    def tokenize(self, texts: Sequence[str]):
        """texts -> ids, mask [B, L] (bucketed, truncated), prompt_tokens [B] (untruncated counts)."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
        full = self.encoder.token_ids(texts)  # untruncated: the prompt's token count
        seqs = [tokens.truncate(f, self.max_length, self.truncation_side) for f in full]
        ids, mask, _ = tokens.batch(seqs, self.max_length, self.encoder.pad_id, self.encoder.length_buckets)
        prompt_tokens = np.zeros(len(ids), np.float32)
        prompt_tokens[: len(seqs)] = [len(f) for f in full]
        return ids, mask, prompt_tokens

    def head_args(self):
        """(head params, centroids) and the static arguments (head_shape, mode) of `route_text_batch`."""
        h = self.head
        return ((None, None) if h is None else (h.params, jnp.asarray(h.centroids)),
                {"head_shape": None if h is None else (h.hidden, h.features), "mode": self.feature_mode})

    def decide(self, texts: Sequence[str], policy: Policy | None = None, key=None,
               constraints: Constraints | None = None, feedback_params=None):
        """`route_text_batch` on texts: (Decision, domain [B] | None, x [B, d]), padding rows kept
        (B is the bucket of len(texts)). key: required when the policy is stochastic (split it per
        call, or the draws repeat); constraints and feedback_params: see `route_text_batch`."""
        policy = policy or self.policy
        if policy.stochastic and key is None:
            raise ValueError(f"a stochastic policy (explore={policy.explore!r}, temperature {float(policy.temperature):g}, "
                             f"epsilon {float(policy.epsilon):g}) needs key=jax.random.PRNGKey(seed), split per call")
        ids, mask, prompt_tokens = self.tokenize(texts)
        book = np.arange(len(ids)) < len(texts)
        (params, centroids), static = self.head_args()
        return route_text_batch(self.encoder.params, params, centroids, self.state, ids, mask, prompt_tokens,
                                policy, book, key, constraints, feedback_params, enc_config=self.encoder.config,
                                **static)

    def route(self, texts: Sequence[str], policy: Policy | None = None, commit_load: bool = False,
              key=None) -> list[Route]:
        """Choose an LLM for each text, with each LLM's predicted quality, cost, uncertainty, penalty."""
        d, domain, _ = self.decide(texts, policy, key)
        if commit_load:
            self.state = commit_load(self.state, d)
        n = len(texts)
        names = {s: name for name, s in self.registry.slots.items()}
        slots = sorted(names)
        arrays = {k: np.asarray(getattr(d, k))[:n][:, slots]
                  for k in ("quality", "cost", "uncertainty", "penalty", "score")}
        domain = [None] * n if domain is None else [self.head.tags[i] for i in np.asarray(domain)[:n]]
        arm = np.asarray(d.arm)[:n]
        return [Route(model=names[int(arm[i])], domain=domain[i],
                      **{k: {names[s]: float(v[i, j]) for j, s in enumerate(slots)} for k, v in arrays.items()})
                for i in range(n)]

    def embed_features(self, e) -> jnp.ndarray:
        """Encoder embeddings [N, H] -> bandit features [N, d]."""
        (params, centroids), static = self.head_args()
        return _featurize_jit(jnp.asarray(e), params, centroids, **static)[0]

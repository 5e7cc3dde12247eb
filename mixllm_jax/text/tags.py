"""The tag-enhanced head: a Flax MLP that turns encoder embeddings into routing features.

Trained with optax on cached embeddings e [N, H] and domain tags (multi-hot [N, G]), with
  - regression: a linear read-out of the features predicts every LLM's quality and log completion
    tokens (NaN targets are masked) -- the LinUCB arms then sit on these features (neural-linear);
  - intra-domain: each query's unit feature vector is pulled toward its domain's centroid;
  - inter-domain: domain centroids are pushed at least `margin` apart.
The head's features are the bandit's in mode "head" only. Domains, in every mode, are the mean unit
*embeddings* of each tag's training queries (`domain_head`, the centroids of `TrainedHead`): a
query belongs to the nearest in the encoder's space, not in the head's, which separates the
training tags better but sends unseen tasks to the wrong domain (docs/architecture.md, "Domains").
Tags are needed only in training; `nearest_domain` explains a query by its closest centroid.
A log without tags gets domains from spherical k-means over its embeddings (`kmeans_domains`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixllm_jax.core.config import HeadConfig


class TagHead(nn.Module):
    """e [N, H] -> features z [N, F] (layer-normalised, so ||z|| ~ sqrt(F))."""

    hidden: int = 256
    features: int = 64

    @nn.compact
    def __call__(self, e):
        h = nn.gelu(nn.Dense(self.hidden)(e))
        return nn.LayerNorm(use_scale=False, use_bias=False)(nn.Dense(self.features)(h))


class TrainedHead(NamedTuple):
    """What routing needs of a trained head: params, sizes, tag names and the domains' centroids
    [G, H] in the encoder's embedding space (mean unit embedding of each tag's training queries).

    params None (hidden = features = 0): domains only, no network (`domain_head`): what every
    feature mode but "head" needs."""

    params: dict | None
    hidden: int
    features: int
    tags: tuple[str, ...]
    centroids: np.ndarray

    def module(self) -> TagHead:
        return TagHead(self.hidden, self.features)


def unit(z, eps=1e-6):
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + eps)


def centroids(z, tag_onehot):
    """Mean unit feature of each domain: z [N, F], tag_onehot [N, G] -> [G, F], counts [G]."""
    n = tag_onehot.sum(0)
    return (tag_onehot.T @ unit(z)) / jnp.maximum(n, 1.0)[:, None], n


def tag_losses(z, tag_onehot, margin):
    """(intra, inter): mean squared distance to own centroid; hinge of centroids closer than margin."""
    c, n = centroids(z, tag_onehot)
    u = unit(z)
    d2 = ((u[:, None, :] - c[None]) ** 2).sum(-1)  # [N, G]
    intra = (tag_onehot * d2).sum() / jnp.maximum(tag_onehot.sum(), 1.0)
    present = n > 0
    pair = present[:, None] & present[None, :] & ~jnp.eye(len(n), dtype=bool)
    cd = jnp.sqrt(((c[:, None] - c[None]) ** 2).sum(-1) + 1e-12)
    inter = jnp.where(pair, jax.nn.relu(margin - cd) ** 2, 0.0).sum() / jnp.maximum(pair.sum(), 1)
    return intra, inter


def multi_hot(tags: Sequence[Sequence[str]], names: Sequence[str] | None = None):
    """Tag tuples per query -> (multi-hot [N, G] float32, tag names)."""
    names = tuple(names) if names is not None else tuple(sorted({t for ts in tags for t in ts}))
    index = {t: i for i, t in enumerate(names)}
    m = np.zeros((len(tags), len(names)), np.float32)
    for i, ts in enumerate(tags):
        for t in ts:
            if t in index:
                m[i, index[t]] = 1.0
    return m, names


def train_head(e: np.ndarray, tags: Sequence[Sequence[str]], quality: np.ndarray, log_tokens: np.ndarray,
               config: HeadConfig = HeadConfig(), progress: bool = False) -> TrainedHead:
    """Train the head on e [N, H], tags, quality [N, M] and log_tokens [N, M] (NaN = unknown)."""
    onehot, names = multi_hot(tags)
    y = np.concatenate([quality, log_tokens], axis=1).astype(np.float32)  # [N, 2M]
    mask = np.isfinite(y).astype(np.float32)
    y = np.nan_to_num(y)
    scale = np.maximum(np.nanstd(np.where(mask > 0, y, np.nan), axis=0), 1e-3)  # per-target scale
    module = TagHead(config.hidden, config.features)
    key = jax.random.PRNGKey(config.seed)
    k_head, k_out, k_perm = jax.random.split(key, 3)
    params = {"head": module.init(k_head, jnp.zeros((1, e.shape[1])))["params"],
              "readout": nn.Dense(y.shape[1]).init(k_out, jnp.zeros((1, config.features)))["params"]}
    opt = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    opt_state = opt.init(params)

    def loss_fn(p, eb, tb, yb, mb):
        z = module.apply({"params": p["head"]}, eb)
        pred = nn.Dense(yb.shape[1]).apply({"params": p["readout"]}, z)
        reg = (mb * ((pred - yb) / scale) ** 2).sum() / jnp.maximum(mb.sum(), 1.0)
        intra, inter = tag_losses(z, tb, config.margin)
        return reg + config.tag_weight * (intra + inter), (reg, intra, inter)

    @jax.jit
    def epoch(params, opt_state, perm):
        def step(carry, idx):
            p, s = carry
            (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, e_d[idx], t_d[idx], y_d[idx], m_d[idx])
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), jnp.stack([loss, *aux])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), perm)
        return params, opt_state, losses.mean(0)

    @jax.jit
    def val_loss(params, idx):
        return loss_fn(params, e_d[idx], t_d[idx], y_d[idx], m_d[idx])[1][0]

    e_d, t_d, y_d, m_d = map(jnp.asarray, (e.astype(np.float32), onehot, y, mask))
    order = np.random.default_rng(config.seed).permutation(len(e))
    n_val = int(len(e) * config.val_frac) if len(e) >= 50 else 0
    val_idx, fit_idx = jnp.asarray(order[:n_val]), jnp.asarray(order[n_val:])
    n = len(fit_idx)
    bs = min(config.batch_size, n)
    steps = n // bs
    epochs = range(config.epochs)
    if progress:
        from mixllm_jax.util import progress as progress_mod
        epochs = progress_mod.bar(epochs, desc="train head", unit="epoch")
    best, best_loss, since = params, np.inf, 0
    for _ in epochs:
        k_perm, k = jax.random.split(k_perm)
        perm = fit_idx[jax.random.permutation(k, n)[: steps * bs].reshape(steps, bs)]
        params, opt_state, losses = epoch(params, opt_state, perm)
        if n_val:
            vl = float(val_loss(params, val_idx))
            best, best_loss, since = (params, vl, 0) if vl < best_loss else (best, best_loss, since + 1)
            if since >= config.patience:
                break
        if progress:
            epochs.set_postfix(loss=f"{float(losses[0]):.3f}",
                              **({"val": f"{best_loss:.3f}"} if n_val and np.isfinite(best_loss) else {}))
    params = best if n_val else params
    return domain_head(e, tags)._replace(params=jax.device_get(params["head"]), hidden=config.hidden,
                                         features=config.features)


def domain_head(e: np.ndarray, tags: Sequence[Sequence[str]]) -> TrainedHead:
    """The domains of e [N, H] and their tags, without a network: centroids [G, H]."""
    onehot, names = multi_hot(tags)
    c, _ = centroids(jnp.asarray(e, jnp.float32), jnp.asarray(onehot))
    return TrainedHead(None, 0, 0, names, np.asarray(c))


def apply_head(head: TrainedHead, e) -> jnp.ndarray:
    """Routing features without the bias: e [N, H] -> z [N, F]."""
    return head.module().apply({"params": head.params}, e)


def nearest_domain(head: TrainedHead, e) -> np.ndarray:
    """Index into head.tags of each query's closest domain centroid (cosine): embeddings e [N, H] -> [N]."""
    return np.asarray(jnp.argmax(unit(jnp.asarray(e)) @ unit(jnp.asarray(head.centroids)).T, axis=1))


def separation_ratio(z, tag_onehot) -> float:
    """Mean distance to own centroid / mean distance between centroids (lower = better separated)."""
    z = jnp.asarray(z)
    t = jnp.asarray(tag_onehot)
    c, n = centroids(z, t)
    d = jnp.sqrt(((unit(z)[:, None] - c[None]) ** 2).sum(-1))
    intra = (t * d).sum() / t.sum()
    g = c.shape[0]
    off = ~jnp.eye(g, dtype=bool)
    inter = jnp.where(off, jnp.sqrt(((c[:, None] - c[None]) ** 2).sum(-1)), 0).sum() / off.sum()
    return float(intra / inter)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(x, key, *, k: int, iters: int = 50):
    """Spherical k-means (k-means++ seeding, cosine assignment): x [N, H] -> (centroids [k, H] unit,
    labels [N] int32)."""
    u = unit(x)
    n = u.shape[0]

    def seed(i, c):
        d = jnp.maximum(jnp.min(1.0 - u @ c.T, axis=1), 0.0) ** 2  # D^2; rows past i hold the first

        j = jax.random.choice(jax.random.fold_in(key, i), n, p=d / jnp.maximum(d.sum(), 1e-12))
        return c.at[i].set(u[j])

    first = u[jax.random.randint(key, (), 0, n)]
    c = jnp.zeros((k, u.shape[1]), u.dtype).at[:].set(first)
    c = jax.lax.fori_loop(1, k, seed, c)

    def lloyd(_, c):
        lab = jnp.argmax(u @ c.T, axis=1)
        s = jax.ops.segment_sum(u, lab, num_segments=k)
        return jnp.where((jnp.linalg.norm(s, axis=1) > 0)[:, None], unit(s), c)

    c = jax.lax.fori_loop(0, iters, lloyd, c)
    return c, jnp.argmax(u @ c.T, axis=1).astype(jnp.int32)


def kmeans_domains(e: np.ndarray, n_domains: int, seed: int = 0) -> list[tuple[str, ...]]:
    """One derived domain tag per query (``("domain-07",)``) from k-means of e [N, H] into
    min(n_domains, N) clusters."""
    k = max(1, min(int(n_domains), len(e)))
    _, labels = kmeans(jnp.asarray(e, jnp.float32), jax.random.PRNGKey(seed), k=k)
    width = len(str(k - 1))
    return [(f"domain-{int(l):0{width}d}",) for l in np.asarray(labels)]

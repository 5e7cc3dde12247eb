"""Fine-tuning the sentence encoder on routing outcomes (RouterDC-style), top layers or LoRA.

    prompts --frozen lower layers, once per data set (HiddenCache)--> h [N, L_i, H] (ragged)
            --top `layers` layers (trained: LoRA adapters, or the weights themselves)--> pooled e [N, H]
            --losses (FinetuneConfig): sample-LLM contrastive against per-query outcomes with a
              learnable key per LLM, sample-sample contrastive within a domain, regression of every
              LLM's quality--> optax adamw, early stopping on a held-out part of the data

`finetune_encoder(encoder, dataset, cfg) -> Encoder` returns a new Encoder whose params are the
base params with the top layers replaced (LoRA merged into the kernels, W + alpha/r A B), so every
consumer (`embed_ids`, the fused route path, serve) runs it unchanged. Its identity adds
"finetune" (a digest of the new top-layer weights, where they start and the base identity) and
"finetune_layers"; the embedding cache keys on "finetune", so fine-tuned and base embeddings never
mix. A checkpoint saves the top layers (`top_layers`) and restores them onto the base weights
(`splice`). See docs/architecture.md ("Fine-tuning the encoder").

The lower layers' hidden states are computed once per data set and stored on disk
(``hidden_cache.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixllm_jax.text import cache as cache_mod
from mixllm_jax.core.config import DEFAULT_DOMAINS, FinetuneConfig
from mixllm_jax.core.padding import pad_rows
from mixllm_jax.text.bert import BertLayer, pool
from mixllm_jax.text.encoder import Encoder
from mixllm_jax.text.hidden_cache import lower_hidden
from mixllm_jax.text.tokens import LENGTH_BUCKETS, padded_length

__all__ = ["FinetuneConfig", "finetune_encoder", "outcome_masks", "top_layers", "splice", "digest",
           "is_finetuned"]

_NEG = -1e30  # the encoder's additive attention bias of masked keys
_MASKED = -1e9  # logits of masked entries in the losses (finite: no NaN gradients)


# --------------------------------------------------------------------------------------------
# Identity, digest, splicing (checkpoints)


def is_finetuned(encoder) -> bool:
    return encoder is not None and "finetune" in getattr(encoder, "identity", {})


def _base_identity(identity: Mapping[str, Any]) -> dict:
    return {k: v for k, v in identity.items() if not k.startswith("finetune")}


def digest(base_identity: Mapping[str, Any], first_layer: int, layers: Any) -> str:
    """16 hex digits of sha256 over the base identity (as the embedding cache keys it), the index of
    the first replaced layer and the bytes of the replaced layers' params (tree order)."""
    h = hashlib.sha256()
    ident = {k: base_identity[k] for k in cache_mod.BASE_IDENTITY_KEYS if k in base_identity}
    h.update(json.dumps({"base": ident, "first_layer": int(first_layer)}, sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(layers):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def top_layers(encoder) -> dict:
    """The fine-tuned layers of a fine-tuned encoder as host arrays: {"layers": stacked [k, ...]}."""
    if not is_finetuned(encoder):
        raise ValueError("the encoder is not fine-tuned (its identity has no 'finetune' digest)")
    k = int(encoder.identity["finetune_layers"])
    n = encoder.config.num_hidden_layers
    return {"layers": jax.tree.map(lambda a: np.asarray(jax.device_get(a))[n - k:], encoder.params["layers"])}


def _replace_top(params: Any, layers: Any, n_total: int) -> dict:
    """The full encoder params with the last len(layers) layers replaced (host numpy, then device)."""
    k = int(jax.tree.leaves(layers)[0].shape[0])
    base = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    new_layers = jax.tree.map(lambda b, t: np.concatenate([b[: n_total - k], np.asarray(t, b.dtype)], 0),
                              base["layers"], layers)
    return jax.device_put({**base, "layers": new_layers})


def _finetuned_encoder(base: Encoder, layers: Any) -> Encoder:
    n = base.config.num_hidden_layers
    k = int(jax.tree.leaves(layers)[0].shape[0])
    ident = _base_identity(base.identity)
    ident.update(finetune=digest(ident, n - k, layers), finetune_layers=k)
    return Encoder(_replace_top(base.params, layers, n), base.config, base.tokenizer, ident, base.max_length)


def splice(base: Encoder, saved: Mapping[str, Any], identity: Mapping[str, Any]) -> Encoder:
    """A base encoder with saved top layers ({"layers": [k, ...]}) put back: the encoder a checkpoint
    was trained with. Raises ValueError when the base or the layers are not the ones recorded in
    `identity` (its base keys and its "finetune" digest)."""
    if is_finetuned(base):
        raise ValueError("splice needs the base encoder, not a fine-tuned one")
    layers = saved["layers"]
    n = base.config.num_hidden_layers
    k = int(identity["finetune_layers"])
    for key in cache_mod.BASE_IDENTITY_KEYS:
        if key in identity and base.identity.get(key) != identity[key]:
            raise ValueError(f"the fine-tuned layers were trained on encoder {identity.get('name')!r} "
                             f"({key} {identity[key]!r}), not on {base.identity.get('name')!r} "
                             f"({key} {base.identity.get(key)!r})")
    want = jax.tree.map(lambda a: a.shape[1:], base.params["layers"])
    got = jax.tree.map(lambda a: tuple(np.shape(a)[1:]), layers)
    if (jax.tree.structure(want) != jax.tree.structure(got) or want != got
            or {np.shape(a)[0] for a in jax.tree.leaves(layers)} != {k} or not 1 <= k <= n):
        raise ValueError(f"saved fine-tuned layers do not fit the encoder {base.identity.get('name')!r}")
    enc = _finetuned_encoder(base, layers)
    if enc.identity["finetune"] != identity["finetune"]:
        raise ValueError(f"fine-tuned layers digest {enc.identity['finetune']} != recorded {identity['finetune']}")
    return enc


# --------------------------------------------------------------------------------------------
# Targets


def outcome_masks(quality: np.ndarray, top_k: int, bottom_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives [N, M] bool of the sample-LLM loss from quality [N, M] (NaN: unknown).

    Positives: observed LLMs scoring at least the query's top_k-th best score and above its worst;
    negatives: at most its bottom_k-th worst and below its best (ties included); an LLM that would
    be both is neither. A query whose LLMs all score the same has neither.
    """
    q = np.asarray(quality, np.float64)
    obs = np.isfinite(q)
    n_obs = obs.sum(1)
    hi = -np.sort(np.where(obs, -q, np.inf), axis=1)  # descending, missing last (-inf)
    lo = np.sort(np.where(obs, q, np.inf), axis=1)  # ascending, missing last (+inf)
    rows = np.arange(len(q))
    kth_hi = hi[rows, np.clip(np.minimum(top_k, n_obs) - 1, 0, None)]
    kth_lo = lo[rows, np.clip(np.minimum(bottom_k, n_obs) - 1, 0, None)]
    q_max, q_min = hi[:, 0], lo[:, 0]
    with np.errstate(invalid="ignore"):
        pos = obs & (q >= kth_hi[:, None]) & (q > q_min[:, None])
        neg = obs & (q <= kth_lo[:, None]) & (q < q_max[:, None])
    both = pos & neg  # few LLMs: a middle one can be in the top_k and the bottom_k; it is neither
    return pos & ~both, neg & ~both


def _domain_ids(tags: Sequence[Sequence[str]]) -> np.ndarray:
    keys = ["+".join(t) if t else "" for t in tags]
    names = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.array([names[k] if k else -1 for k in keys], np.int32)  # -1: no domain (no positives)


# --------------------------------------------------------------------------------------------
# The trainable top


def _lora_interceptor(lora: Mapping[str, Any], scale: float):
    """Adds scale * (x A) B to the output of each Dense named in `lora` (flax method interception)."""

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, nn.Dense) and m.name in lora:
            x = args[0]
            ab = lora[m.name]
            mm = lambda u, v: jnp.matmul(u, v, precision=m.precision)
            return next_fun(*args, **kwargs) + scale * mm(mm(x, ab["a"]), ab["b"])
        return next_fun(*args, **kwargs)

    return intercept


def top_embed(layers: Any, lora: Any, h, mask, config, scale: float = 1.0):
    """Pooled embeddings [B, H] from lower hidden states h [B, L, H] through stacked layer params
    [k, ...] (and LoRA adapters {name: {"a": [k, in, r], "b": [k, r, out]}} or None)."""
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, _NEG).astype(h.dtype)
    k = jax.tree.leaves(layers)[0].shape[0]
    for i in range(k):
        p = jax.tree.map(lambda a: a[i], layers)
        if lora:
            with nn.intercept_methods(_lora_interceptor(jax.tree.map(lambda a: a[i], lora), scale)):
                h, _ = BertLayer(config).apply({"params": p}, h, bias)
        else:
            h, _ = BertLayer(config).apply({"params": p}, h, bias)
    return pool(h, mask, config).astype(jnp.float32)


def merge_lora(layers: Any, lora: Any, scale: float) -> Any:
    """Stacked layer params with each adapted kernel replaced by W + scale * A B (host numpy)."""
    out = jax.tree.map(lambda a: np.array(jax.device_get(a), np.float32), layers)
    for name, ab in lora.items():
        a, b = np.asarray(jax.device_get(ab["a"]), np.float64), np.asarray(jax.device_get(ab["b"]), np.float64)
        out[name]["kernel"] = (out[name]["kernel"] + scale * np.einsum("kir,kro->kio", a, b)).astype(np.float32)
    return out


def _init_lora(layers, targets, rank, key):
    lora = {}
    for t in targets:
        kern = layers[t]["kernel"]  # [k, in, out]
        key, sub = jax.random.split(key)
        lora[t] = {"a": jax.random.normal(sub, (kern.shape[0], kern.shape[1], rank), jnp.float32) / math.sqrt(kern.shape[1]),
                   "b": jnp.zeros((kern.shape[0], rank, kern.shape[2]), jnp.float32)}
    return lora


def _losses(trainable, frozen_layers, batch, cfg: FinetuneConfig, config, scale, q_scale, method):
    h, mask, w, pos, neg, q, qm, dom = batch
    if method == "lora":
        e = top_embed(frozen_layers, trainable["adapter"], h.astype(jnp.float32), mask, config, scale)
    else:
        e = top_embed(trainable["adapter"], None, h.astype(jnp.float32), mask, config)
    valid = w > 0
    # sample-LLM contrastive (RouterDC): each positive LLM against all of the query's negatives
    keys = trainable["keys"] / (jnp.linalg.norm(trainable["keys"], axis=1, keepdims=True) + 1e-6)
    s = e @ keys.T / cfg.temperature
    neg_lse = jax.nn.logsumexp(jnp.where(neg, s, _MASKED), axis=1, keepdims=True)
    per_pos = jax.nn.softplus(neg_lse - s)  # -log(e^s_p / (e^s_p + sum_n e^s_n))
    has = valid & pos.any(1) & neg.any(1)
    row = (pos * per_pos).sum(1) / jnp.maximum(pos.sum(1), 1)
    l_con = jnp.where(has, row, 0.0).sum() / jnp.maximum(has.sum(), 1)
    # sample-sample contrastive within a domain (supervised contrastive over the batch)
    sim = e @ e.T / cfg.sample_temperature
    others = valid[None, :] & ~jnp.eye(e.shape[0], dtype=bool)
    log_p = sim - jax.nn.logsumexp(jnp.where(others, sim, _MASKED), axis=1, keepdims=True)
    same = others & (dom[:, None] == dom[None, :]) & (dom[:, None] >= 0)
    n_same = same.sum(1)
    anchor = valid & (n_same > 0)
    row = -jnp.where(same, log_p, 0.0).sum(1) / jnp.maximum(n_same, 1)
    l_ss = jnp.where(anchor, row, 0.0).sum() / jnp.maximum(anchor.sum(), 1)
    # regression of every LLM's quality from e (linear read-out)
    pred = e @ trainable["readout"]["w"] + trainable["readout"]["b"]
    wm = qm * valid[:, None]
    l_reg = (wm * ((pred - q) / q_scale) ** 2).sum() / jnp.maximum(wm.sum(), 1.0)
    total = cfg.contrastive * l_con + cfg.sample * l_ss + cfg.regression * l_reg
    # routing accuracy of the LLM keys: quality of the LLM most similar to the query, as a share of the best's
    seen = valid & (qm > 0).any(1)
    best = jnp.max(jnp.where(qm > 0, q, -1.0), axis=1)
    chosen = jnp.take_along_axis(q, jnp.argmax(jnp.where(qm > 0, s, _MASKED), axis=1)[:, None], 1)[:, 0]
    hit = jnp.where(seen, chosen, 0.0).sum(), jnp.where(seen, best, 0.0).sum()
    return total, (total, l_con, l_ss, l_reg, hit[0], hit[1], valid.sum())


# --------------------------------------------------------------------------------------------
# Batching


def _batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Row index batches: shuffled (rng) into chunks of 16 batches, each chunk sorted by length so a
    batch pads little; the batch order shuffled again. rng None: in order of length (evaluation)."""
    if rng is None:
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        return [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    rows = rng.permutation(rows)
    out = []
    chunk = 16 * batch_size
    for c in range(0, len(rows), chunk):
        part = rows[c: c + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        out += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def _make_batch(idx, hidden, start, length, targets, batch_size, max_length):
    """Host arrays of one batch padded to batch_size rows and a length bucket. Padding rows repeat
    the first row with weight 0 (an all-zero row could pool to a zero vector: NaN gradients)."""
    L = padded_length(int(length[idx].max()), max_length, LENGTH_BUCKETS)
    H = hidden.shape[1]
    h = np.zeros((batch_size, L, H), np.float16)
    mask = np.zeros((batch_size, L), np.int32)
    for j, i in enumerate(idx):
        h[j, : length[i]] = hidden[start[i]: start[i] + length[i]]
        mask[j, : length[i]] = 1
    h[len(idx):], mask[len(idx):] = h[0], mask[0]
    w = np.zeros(batch_size, np.float32)
    w[: len(idx)] = 1.0
    pad = lambda a: pad_rows(a[idx], batch_size)  # noqa: E731
    pos, neg, q, qm, dom = targets
    return (h, mask, w, pad(pos), pad(neg), pad(q), pad(qm), pad(dom))


# --------------------------------------------------------------------------------------------
# The entry point


def finetune_encoder(encoder: Encoder, dataset, cfg: FinetuneConfig = FinetuneConfig(), *, max_length: int = 128,
                     truncation_side: str = "left", domains: int | None = None, cache_dir=None,
                     use_cache: bool = True, progress: bool = True) -> Encoder:
    """Fine-tune the top `cfg.layers` layers of `encoder` on `dataset`'s outcomes; returns a new Encoder.

    dataset: a Dataset (prompts, quality [N, M], tags). Domains of the sample-sample loss: the tags;
    k-means clusters of the base embeddings (`domains`, default DEFAULT_DOMAINS) when the log has
    none or `domains` is given. The returned encoder has a `finetune_report` attribute (epochs run,
    best epoch, per-epoch train and held-out losses).
    """
    from mixllm_jax.text import tags as tags_mod

    n = encoder.config.num_hidden_layers
    k = cfg.layers
    if k > n:
        raise ValueError(f"cannot fine-tune {k} layers of a {n}-layer encoder")
    hidden, start, length = lower_hidden(encoder, dataset.prompts, n - k, max_length, truncation_side,
                                         cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    quality = np.asarray(dataset.quality, np.float32)
    pos, neg = outcome_masks(quality, cfg.top_k, cfg.bottom_k)
    qm = np.isfinite(quality)
    q = np.nan_to_num(quality)
    q_mean = np.array([quality[qm[:, j], j].mean() if qm[:, j].any() else 0.0 for j in range(q.shape[1])], np.float32)
    q_scale = np.maximum(np.nanstd(quality, axis=0), 1e-3).astype(np.float32)
    base_layers = jax.tree.map(lambda a: jnp.asarray(a[n - k:]), encoder.params["layers"])
    scale = cfg.lora_alpha / cfg.rank
    config = encoder.config
    eval_embed = jax.jit(lambda layers, h, mask: top_embed(layers, None, h.astype(jnp.float32), mask, config))

    def embed_rows(layers, rows):
        out = np.zeros((len(rows), encoder.hidden_size), np.float32)
        for b in _batches(np.arange(len(rows)), length[rows], cfg.batch_size, None):
            batch = _make_batch(rows[b], hidden, start, length, (pos, neg, q, qm, np.zeros(len(q), np.int32)),
                                cfg.batch_size, max_length)
            out[b] = np.asarray(eval_embed(layers, batch[0], batch[1]))[: len(b)]
        return out

    if domains is None and any(dataset.tags):
        dom = _domain_ids(dataset.tags)
    elif cfg.sample > 0:
        e0 = embed_rows(base_layers, np.arange(len(q)))
        dom = _domain_ids(tags_mod.kmeans_domains(e0, domains or DEFAULT_DOMAINS, seed=cfg.seed))
    else:
        dom = np.full(len(q), -1, np.int32)
    targets = (pos, neg, q, qm.astype(np.float32), dom)

    key = jax.random.PRNGKey(cfg.seed)
    k_ad, k_keys = jax.random.split(key)
    adapter = _init_lora(base_layers, cfg.lora_targets, cfg.rank, k_ad) if cfg.method == "lora" else base_layers
    trainable = {"adapter": adapter,
                 "keys": jax.random.normal(k_keys, (q.shape[1], encoder.hidden_size), jnp.float32),
                 "readout": {"w": jnp.zeros((encoder.hidden_size, q.shape[1]), jnp.float32),
                             "b": jnp.asarray(q_mean)}}
    opt = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    opt_state = opt.init(trainable)
    frozen = base_layers if cfg.method == "lora" else None
    loss_fn = lambda p, batch: _losses(p, frozen, batch, cfg, config, scale, jnp.asarray(q_scale), cfg.method)

    @jax.jit
    def step(p, s, batch):
        (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, jnp.stack(aux)

    eval_loss = jax.jit(lambda p, batch: jnp.stack(loss_fn(p, batch)[1]))

    order = np.random.default_rng(cfg.seed).permutation(len(q))
    n_val = int(round(cfg.val_frac * len(q))) if len(q) >= 20 else 0
    val_rows, fit_rows = order[:n_val], order[n_val:]
    rng = np.random.default_rng(cfg.seed + 1)

    def summarise(stats):
        s = np.sum([np.asarray(a) * float(a[-1]) for a in stats], axis=0) / max(sum(float(a[-1]) for a in stats), 1)
        hit = np.sum([np.asarray(a)[4:6] for a in stats], axis=0)
        return {"loss": float(s[0]), "contrastive": float(s[1]), "sample": float(s[2]), "regression": float(s[3]),
                "key_routing": float(hit[0] / max(hit[1], 1e-9))}

    def evaluate(p):
        stats = [eval_loss(p, _make_batch(b, hidden, start, length, targets, cfg.batch_size, max_length))
                 for b in _batches(val_rows, length, cfg.batch_size, None)]
        return summarise(stats)

    history, best, best_loss, best_epoch, since = [], trainable, np.inf, 0, 0
    steps_per_epoch = math.ceil(len(fit_rows) / cfg.batch_size)
    bar = None
    if progress:
        from mixllm_jax.util import progress as progress_mod
        bar = progress_mod.bar(total=cfg.epochs * steps_per_epoch, desc=f"finetune encoder ({cfg.method}, {k} layer(s))",
                   unit="step")
    for epoch in range(cfg.epochs):
        stats = []
        for b in _batches(fit_rows, length, cfg.batch_size, rng):
            trainable, opt_state, aux = step(trainable, opt_state,
                                             _make_batch(b, hidden, start, length, targets, cfg.batch_size, max_length))
            stats.append(aux)
            if bar is not None:
                bar.update(1)
        rec = {"epoch": epoch + 1, "train": summarise(stats)}
        if n_val:
            rec["val"] = evaluate(trainable)
            if rec["val"]["loss"] < best_loss:
                best, best_loss, best_epoch, since = trainable, rec["val"]["loss"], epoch + 1, 0
            else:
                since += 1
        history.append(rec)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{rec['train']['loss']:.3f}",
                            val=f"{rec['val']['loss']:.3f}" if n_val else "-")
        if n_val and since >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    final = best if n_val else trainable
    if cfg.method == "lora":
        layers = merge_lora(base_layers, final["adapter"], scale)
    else:
        layers = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), final["adapter"])
    out = _finetuned_encoder(encoder, layers)
    out.finetune_report = {"config": dataclasses.asdict(cfg), "epochs_run": len(history),
                           "best_epoch": best_epoch if n_val else len(history), "n_fit": int(len(fit_rows)),
                           "n_val": int(n_val), "history": history}
    return out

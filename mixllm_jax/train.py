"""Offline training: encode (cached), train the tag-enhanced head, fill every arm from logged outcomes."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mixllm_jax import cache, engine, tags
from mixllm_jax.data import Dataset, ModelSpec
from mixllm_jax.policy import Policy
from mixllm_jax.router import FEATURE_MODES, Router
from mixllm_jax.state import ArmRegistry, add_llm, init_state

UPDATE_CHUNK = 8192


def log_tokens(completion_tokens: np.ndarray) -> np.ndarray:
    """The length target: log of completion tokens (at least 1)."""
    return np.log(np.maximum(completion_tokens, 1.0)).astype(np.float32)


def embed(encoder, dataset: Dataset, max_length: int = 256, truncation_side: str = "left",
          cache_dir=None, progress: bool = True) -> np.ndarray:
    """Encoder embeddings of the dataset's prompts [N, H], through the on-disk cache."""
    return cache.embed_cached(encoder, dataset.prompts, max_length=max_length,
                              truncation_side=truncation_side, cache_dir=cache_dir, progress=progress)


def new_state(specs: Sequence[ModelSpec], dim: int, ridge: float = 1.0):
    """An empty state and registry holding `specs` in order, capacity the next power of two."""
    capacity = 1 << max(1, (len(specs) - 1).bit_length())
    slots = max([s.max_concurrency or 8 for s in specs] + [32])
    state, reg = init_state(capacity, dim, load_slots=slots, ridge=ridge), ArmRegistry(capacity)
    for s in specs:
        state, reg = add_llm(state, reg, s.name, price_in=s.price_in, price_out=s.price_out,
                             ttft=s.ttft_s if s.ttft_s is not None else 0.5,
                             tokens_per_s=s.tokens_per_s or 50.0, max_concurrency=s.max_concurrency or 8)
    return state, reg


def fill_arms(state, registry: ArmRegistry, x: np.ndarray, dataset: Dataset, weight: float = 1.0):
    """Full-information fit: every (query, LLM) outcome with a known quality updates that LLM's arm."""
    q, lt = dataset.quality, log_tokens(dataset.completion_tokens)
    rows, cols = np.nonzero(np.isfinite(q))
    slots = np.array([registry.slot(m) for m in dataset.models], np.int32)
    targets = np.stack([q[rows, cols], lt[rows, cols]], 1)
    for i in range(0, len(rows), UPDATE_CHUNK):
        sl = slice(i, i + UPDATE_CHUNK)
        state = engine.update(state, x[rows[sl]], slots[cols[sl]], targets[sl],
                              np.full(len(rows[sl]), weight, np.float32))
    return state


def train_router(dataset: Dataset, specs: Sequence[ModelSpec], encoder, *,
                 head_config: tags.HeadConfig | None = tags.HeadConfig(), max_length: int = 256,
                 truncation_side: str = "left", feature_mode: str = "raw+domain", ridge: float = 30.0,
                 policy: Policy = Policy(),
                 cache_dir=None, embeddings: np.ndarray | None = None, progress: bool = True,
                 fill=None) -> Router:
    """Train a Router on logged outcomes (see router.featurize for the feature modes).

    head_config None trains no head (feature_mode must then be "raw"). fill: a replacement for
    `fill_arms` with its signature (e.g. the sharded fills of mesh.py and distributed.py).
    """
    by_name = {s.name: s for s in specs}
    missing = [m for m in dataset.models if m not in by_name]
    if missing:
        raise ValueError(f"models {missing} of the data are not in the models file")
    if feature_mode not in FEATURE_MODES:
        raise ValueError(f"feature_mode must be one of {FEATURE_MODES}, got {feature_mode!r}")
    if head_config is None and feature_mode != "raw":
        raise ValueError(f"feature_mode {feature_mode!r} needs the tag head (head_config is None)")
    e = embed(encoder, dataset, max_length, truncation_side, cache_dir, progress) if embeddings is None else embeddings
    head = None
    if head_config is not None:
        head = tags.train_head(e, dataset.tags, dataset.quality, log_tokens(dataset.completion_tokens),
                               head_config, progress=progress)
    router = Router(encoder=encoder, head=head, state=None, registry=None, policy=policy,
                    max_length=max_length, truncation_side=truncation_side, feature_mode=feature_mode)
    x = np.asarray(router.embed_features(e))
    state, router.registry = new_state([by_name[m] for m in dataset.models], x.shape[1], ridge)
    router.state = (fill or fill_arms)(state, router.registry, x, dataset)
    return router

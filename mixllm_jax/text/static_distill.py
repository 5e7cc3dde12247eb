"""Distilling the static encoder tier from the transformer (Model2Vec's method).

    every vocabulary token v --[CLS] v [SEP] through the transformer, mean-pooled--> [V, H]
        --PCA (numpy SVD, centred) to D dims--> E [V, D];  w [V] = log(1 + rank) (Zipf: the
        vocabulary order stands in for the frequency rank), 0 for special tokens

``distill`` writes the folder that ``static_encoder`` describes and ``encoder.load_encoder("static:DIR")``
loads (``mixllm-jax distill-encoder``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from mixllm_jax.text import encoder as enc_mod
from mixllm_jax.text.static_encoder import DEFAULT_MAX_LENGTH, MAX_TOKENS

WEIGHTINGS = ("zipf", "sif", "none")
DEFAULT_DIMS = 256
SIF_COEFFICIENT = 1e-4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def token_weights(vocab_size: int, special_ids, weighting: str = "zipf",
                  sif_coefficient: float = SIF_COEFFICIENT) -> np.ndarray:
    """[V] float32 token weights, the vocabulary order standing in for the frequency rank.

    "zipf": log(1 + rank) (Model2Vec's Zipf weighting: frequent tokens weigh less);
    "sif": a / (a + p(rank)), p Zipf's law over the vocabulary (Model2Vec's later SIF weighting);
    "none": 1. Special tokens ([CLS], [SEP], [PAD], ...) weigh 0 either way.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    rank = np.arange(vocab_size, dtype=np.float64)
    if weighting == "zipf":
        w = np.log1p(rank)
    elif weighting == "sif":
        p = 1.0 / (rank + 2.0)
        p /= p.sum()
        w = sif_coefficient / (sif_coefficient + p)
    else:
        w = np.ones(vocab_size)
    w[[i for i in special_ids if 0 <= i < vocab_size]] = 0.0
    return w.astype(np.float32)


def pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """x [N, H] -> (centred x projected on its top `dims` principal axes [N, dims] float32,
    explained variance ratio of each kept axis [dims]); float64, the SVD of the [H, H] scatter
    matrix (its right singular vectors are x's principal axes; ~100x faster than x's own SVD at
    N=30k). dims >= H keeps every axis (a rotation of the centred vectors)."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, var, vt = np.linalg.svd(x.T @ x)  # var: the squared singular values of x, descending
    dims = min(int(dims), vt.shape[0])
    return (x @ vt[:dims].T).astype(np.float32), (var[:dims] / var.sum())


def token_vectors(source: enc_mod.Encoder, batch_size: int = 512, progress: bool = True) -> np.ndarray:
    """[V, H] float32: each vocabulary token as ``[CLS] token [SEP]`` through the transformer, the
    three hidden states mean-pooled (bert.pool, not normalised). One jitted shape [batch, 3]."""
    if source.kind != "bert":
        raise ValueError("distillation needs a transformer encoder")
    tok = source.tokenizer
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer has no [CLS]/[SEP] tokens")
    config = dataclasses.replace(source.config, pooling="mean", normalize=False)
    fn = jax.jit(lambda p, ids, mask: enc_mod.embed_ids(p, config, ids, mask))
    V = config.vocab_size
    out = np.zeros((V, config.hidden_size), np.float32)
    mask = np.ones((batch_size, 3), np.int32)
    starts = range(0, V, batch_size)
    if progress:
        from mixllm_jax.util import progress as progress_mod

        starts = progress_mod.bar(starts, total=math.ceil(V / batch_size), desc="distill", unit="batch")
    pending = None  # materialise one batch behind the dispatch
    for start in starts:
        n = min(batch_size, V - start)
        ids = np.empty((batch_size, 3), np.int32)
        ids[:, 0], ids[:, 2] = cls_id, sep_id
        ids[:, 1] = start + np.arange(batch_size) % n  # a short last batch repeats its tokens
        result = (start, n, fn(source.params, ids, mask))
        if pending is not None:
            out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2])[: pending[1]]
        pending = result
    out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2])[: pending[1]]
    return out


def distill(out: str | Path, source: str | Path | enc_mod.Encoder | None = None, dims: int = DEFAULT_DIMS,
            weighting: str = "zipf", batch_size: int = 512, progress: bool = True) -> dict:
    """Distil a static encoder from a transformer (default: the installed all-MiniLM-L6-v2) into
    folder `out`; returns the config.json written (with timings)."""
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    t0 = time.perf_counter()
    src = source if isinstance(source, enc_mod.Encoder) else enc_mod.load_encoder(source, matmul_dtype="float32")
    vecs = token_vectors(src, batch_size, progress)
    t_forward = time.perf_counter() - t0
    emb, ratio = pca(vecs, dims)
    weights = token_weights(len(emb), src.tokenizer.all_special_ids, weighting)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file({"embeddings": np.ascontiguousarray(emb), "weights": weights}, str(out / "model.safetensors"))
    src_dir = Path(src.identity["path"])
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy(src_dir / name, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        src.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    cfg = {
        "model_type": "static",
        "created_by": "mixllm-jax distill-encoder",
        "method": "Model2Vec: [CLS] token [SEP] mean-pooled through the transformer, PCA, token weights",
        "source": {k: src.identity[k] for k in ("name", "hidden_size", "model_bytes") if k in src.identity},
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "pca_dims": int(emb.shape[1]),
        "explained_variance": float(ratio.sum()),
        "weighting": weighting,
        "special_tokens": {k: str(getattr(src.tokenizer, k)) for k in
                           ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
                           if getattr(src.tokenizer, k, None) is not None},
        "normalize": True,
        "max_length": DEFAULT_MAX_LENGTH,
        "max_position_embeddings": MAX_TOKENS,
        "forward_seconds": round(t_forward, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return cfg

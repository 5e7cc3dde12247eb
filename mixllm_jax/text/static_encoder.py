"""The static encoder tier: per-token vectors distilled from the transformer (Model2Vec's method).

    distill:  every vocabulary token v --[CLS] v [SEP] through the transformer, mean-pooled--> [V, H]
              --PCA (numpy SVD, centred) to D dims--> E [V, D];  w [V] = log(1 + rank) (Zipf: the
              vocabulary order stands in for the frequency rank), 0 for special tokens
    embed:    ids, mask [B, L] -> e [B, D] = normalize(sum_t m_t w[ids_t] E[ids_t] / sum_t m_t w[ids_t])

A text's embedding is the normalized weighted mean of its tokens' vectors: a gather and a weighted
sum, ~0.1 MFLOP per text against MiniLM-L6's ~2.9 GFLOP at 128 tokens, and no position embeddings,
so a text is not limited to the transformer's 512 positions (max_length still truncates).

Saved as a folder: ``model.safetensors`` (``embeddings`` [V, D] float32, ``weights`` [V] float32),
``config.json`` (``model_type: "static"``, dims, weighting, source, explained variance) and the
source's tokenizer files (``tokenizer.json`` ...). Loaded with ``encoder.load_encoder("static:DIR")``
into the same ``encoder.Encoder`` object the transformer uses; ``StaticConfig`` (hashable) plays
BertConfig's part as the static argument of the jitted computations (``encoder.embed_ids``
dispatches on it), so ``router.route_text_batch`` and ``serve.compute.serve_route`` run either kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mixllm_jax.text import encoder as enc_mod

WEIGHTINGS = ("zipf", "sif", "none")
DEFAULT_DIMS = 256
DEFAULT_MAX_LENGTH = 512  # the default token limit of Encoder.embed (the router's max_length rules routing)
MAX_TOKENS = 8192  # the longest token sequence accepted (there are no position embeddings)
STATIC_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SIF_COEFFICIENT = 1e-4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class StaticConfig:
    """What the static embedding needs (hashable: the static argument of jitted computations)."""

    kind: ClassVar[str] = "static"
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int = MAX_TOKENS  # bounds max_length (Encoder._check)
    normalize: bool = True

    def embed_ids(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return embed_ids(params, self, ids, mask)


def embed_ids(params: Any, config: StaticConfig, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids [B, L] int32, mask [B, L] (1 = real token) -> [B, D] float32: the weighted mean of the
    tokens' vectors, L2-normalised. params: {"embeddings": [V, D], "weights": [V]}. A row whose
    tokens all weigh 0 (all-zero mask, or only special tokens) embeds to the zero vector."""
    ids = jnp.asarray(ids, jnp.int32)
    w = params["weights"][ids] * jnp.asarray(mask, jnp.float32)  # [B, L]
    v = params["embeddings"][ids]  # [B, L, D]
    e = jnp.einsum("bl,bld->bd", w, v, precision="highest")
    e = e / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-9)
    if config.normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Distillation


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
    three hidden states mean-pooled (encoder.pool, not normalised). One jitted shape [batch, 3]."""
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


# --------------------------------------------------------------------------------------------
# Loading


class StaticTokenizer:
    """The few parts of a transformers fast tokenizer the project uses, over ``tokenizers`` alone
    (importing transformers costs a second of a CLI call's start): ``backend_tokenizer``, the
    special token ids, ``all_special_ids``, ``decode`` and ``len``."""

    def __init__(self, folder: str | Path, special_tokens: dict | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        special = dict(special_tokens or {})
        if not special and (folder / "special_tokens_map.json").is_file():
            raw = json.loads((folder / "special_tokens_map.json").read_text())
            special = {k: v["content"] if isinstance(v, dict) else v for k, v in raw.items() if k.endswith("_token")}
        self.special_tokens = special
        for role in ("pad", "unk", "cls", "sep", "mask"):
            tok = special.get(f"{role}_token")
            setattr(self, f"{role}_token_id", None if tok is None else self.backend_tokenizer.token_to_id(tok))
        self.all_special_ids = sorted({i for i in (self.backend_tokenizer.token_to_id(t) for t in special.values())
                                       if i is not None})

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_static(folder: str | Path) -> enc_mod.Encoder:
    """A static encoder folder (see `distill`) -> an encoder.Encoder with a StaticConfig.

    identity: name "static:<folder>", kind "static", path, hidden_size, model_bytes and digest
    (sha256 of the weights: the embedding cache keys on it, so a moved folder keeps its cache).
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise enc_mod.EncoderNotFoundError(
            f"No static encoder in {folder}: it needs config.json and model.safetensors. Make one with\n"
            f"    mixllm-jax distill-encoder --out {folder}")
    folder = folder.resolve()
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "static":
        raise ValueError(f"{folder}/config.json is not a static encoder's (model_type {cfg.get('model_type')!r})")
    from safetensors.numpy import load_file

    t = load_file(str(folder / "model.safetensors"))
    emb, weights = np.asarray(t["embeddings"], np.float32), np.asarray(t["weights"], np.float32)
    if emb.ndim != 2 or weights.shape != (emb.shape[0],):
        raise ValueError(f"{folder}: embeddings {emb.shape} and weights {weights.shape} do not match")
    config = StaticConfig(vocab_size=int(emb.shape[0]), hidden_size=int(emb.shape[1]),
                          max_position_embeddings=int(cfg.get("max_position_embeddings", MAX_TOKENS)),
                          normalize=bool(cfg.get("normalize", True)))
    tokenizer = StaticTokenizer(folder, cfg.get("special_tokens"))
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, the embeddings {config.vocab_size}")
    identity = {"name": enc_mod.STATIC_PREFIX + str(folder), "kind": "static", "path": str(folder),
                "hidden_size": config.hidden_size, "model_bytes": (folder / "model.safetensors").stat().st_size,
                "digest": _digest(folder / "model.safetensors")}
    params = jax.device_put({"embeddings": emb, "weights": weights})
    return enc_mod.Encoder(params, config, tokenizer, identity,
                           min(int(cfg.get("max_length", DEFAULT_MAX_LENGTH)), config.max_position_embeddings),
                           length_buckets=STATIC_LENGTH_BUCKETS)

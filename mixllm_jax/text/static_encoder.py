"""The static encoder tier: per-token vectors distilled from the transformer (Model2Vec's method).

    embed:    ids, mask [B, L] -> e [B, D] = normalize(sum_t m_t w[ids_t] E[ids_t] / sum_t m_t w[ids_t])

A text's embedding is the normalized weighted mean of its tokens' vectors (E [V, D] and the token
weights w [V] made by ``static_distill.distill``): a gather and a weighted sum, ~0.1 MFLOP per text
against MiniLM-L6's ~2.9 GFLOP at 128 tokens, and no position embeddings, so a text is not limited
to the transformer's 512 positions (max_length still truncates).

Saved as a folder: ``model.safetensors`` (``embeddings`` [V, D] float32, ``weights`` [V] float32),
``config.json`` (``model_type: "static"``, dims, weighting, source, explained variance) and the
source's tokenizer files (``tokenizer.json`` ...). Loaded with ``encoder.load_encoder("static:DIR")``
(``read_static`` here) into the same ``encoder.Encoder`` object the transformer uses; ``StaticConfig``
(hashable) plays BertConfig's part as the static argument of the jitted computations
(``encoder.embed_ids`` dispatches on it), so ``router.route_text_batch`` and
``serve.compute.serve_route`` run either kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

STATIC_PREFIX = "static:"  # --encoder static:PATH loads a distilled static encoder
DEFAULT_MAX_LENGTH = 512  # the default token limit of Encoder.embed (the router's max_length rules routing)
MAX_TOKENS = 8192  # the longest token sequence accepted (there are no position embeddings)
STATIC_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


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


def read_static(folder: Path) -> dict:
    """A static encoder folder (see `static_distill.distill`) -> the ``encoder.Encoder`` arguments of it:
    params, a StaticConfig, the tokenizer, identity, max_length and the static length buckets
    (``encoder.load_static`` checks that the folder exists and builds the Encoder).

    identity: name "static:<folder>", kind "static", path, hidden_size, model_bytes and digest
    (sha256 of the weights: the embedding cache keys on it, so a moved folder keeps its cache).
    """
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
    identity = {"name": STATIC_PREFIX + str(folder), "kind": "static", "path": str(folder),
                "hidden_size": config.hidden_size, "model_bytes": (folder / "model.safetensors").stat().st_size,
                "digest": _digest(folder / "model.safetensors")}
    return {"params": jax.device_put({"embeddings": emb, "weights": weights}), "config": config,
            "tokenizer": tokenizer, "identity": identity,
            "max_length": min(int(cfg.get("max_length", DEFAULT_MAX_LENGTH)), config.max_position_embeddings),
            "length_buckets": STATIC_LENGTH_BUCKETS}

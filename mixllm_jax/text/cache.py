"""On-disk caches: embeddings keyed by (encoder identity, truncation side, max length, text), and the
folder of JAX's persistent compilation cache (`enable_compilation_cache`).

The identity is the encoder's name, hidden size and weight file size, plus the digest of its
fine-tuning when it was fine-tuned (finetune.py), so base and fine-tuned embeddings never mix.

One group per (encoder, side, max_length) setting: ``<root>/embeddings/<group-hash>/`` holds
``meta.json`` (the setting, for humans) and ``store.npz`` with ``keys`` [M] (sha256 hex of each text,
bytes) and ``emb`` [M, H] float32. Writes go to a temporary file then ``os.replace``, so a reader
never sees a half-written store. Concurrent writers do not lock: each merges the store it finds
before replacing it, so at worst a race loses entries that are recomputed later.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# the weights (not "path": the same weights may move)
BASE_IDENTITY_KEYS = ("name", "hidden_size", "model_bytes")
# + how they compute (only a bf16 transformer's identity has a matmul_dtype) and a fine-tuned
# encoder's digest (finetune.py)
IDENTITY_KEYS = BASE_IDENTITY_KEYS + ("matmul_dtype", "finetune")
# an identity with a weights digest (the static tier: its name holds its folder) keys on the digest
_DIGEST_KEYS = ("kind", "digest", "hidden_size", "model_bytes", "finetune")


def default_cache_dir() -> Path:
    """Env ``MIXLLM_CACHE``, else ``~/.cache/mixllm-jax``."""
    return Path(os.environ.get("MIXLLM_CACHE") or Path.home() / ".cache" / "mixllm-jax").expanduser()


def compilation_cache_dir() -> Path:
    """Where the JAX persistent compilation cache lives: ``default_cache_dir() / "jax"``."""
    return default_cache_dir() / "jax"


def enable_compilation_cache(path: str | Path | None = None, min_compile_time_s: float = 0.05) -> Path | None:
    """Turn on JAX's persistent compilation cache at `path` (default `compilation_cache_dir()`), so a
    later process finds its compiled executables on disk instead of compiling them again.

    Compilations taking at least `min_compile_time_s` are stored. Env ``MIXLLM_COMPILATION_CACHE=off``
    disables it. Returns the folder, or None when disabled or when JAX refuses the setting.
    """
    if os.environ.get("MIXLLM_COMPILATION_CACHE", "").lower() in ("off", "0", "no", "false"):
        return None
    import jax

    folder = Path(path) if path is not None else compilation_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError, ValueError):
        return None
    return folder


def text_key(text: str) -> bytes:
    """sha256 hex digest of the UTF-8 text, as bytes (64 chars)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest().encode("ascii")


class EmbeddingCache:
    """Embeddings of one (encoder identity, truncation side, max length) setting, on disk."""

    def __init__(
        self,
        identity: Mapping[str, Any],
        truncation_side: str,
        max_length: int,
        cache_dir: str | Path | None = None,
    ):
        keys = _DIGEST_KEYS if "digest" in identity else IDENTITY_KEYS
        ident = {k: identity[k] for k in keys if k in identity}
        if "name" not in ident and "digest" not in ident:
            raise ValueError("identity needs at least a 'name'")
        self.setting = {"encoder": ident, "truncation_side": str(truncation_side), "max_length": int(max_length)}
        digest = hashlib.sha256(json.dumps(self.setting, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(cache_dir or default_cache_dir()) / "embeddings" / digest
        self.path = self.dir / "store.npz"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """-> keys [M] bytes (sha256 hex), emb [M, H] float32; empty arrays when nothing is stored."""
        if not self.path.is_file():
            return np.zeros((0,), "S64"), np.zeros((0, 0), np.float32)
        with np.load(self.path, allow_pickle=False) as z:
            return z["keys"], z["emb"]

    def __len__(self) -> int:
        return len(self.load()[0])

    def _save(self, keys: np.ndarray, emb: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.is_file():
            _atomic_write(meta, lambda f: f.write(json.dumps(self.setting, indent=1).encode()))
        _atomic_write(self.path, lambda f: np.savez(f, keys=keys, emb=emb))

    def get_or_compute(self, texts: Sequence[str], compute_fn: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """texts (N) -> embeddings [N, H] float32, calling ``compute_fn(missing texts) -> [M, H]``
        once, on the distinct texts not yet stored, and persisting them; nothing is computed when
        all texts are cached."""
        texts = list(texts)
        keys = [text_key(t) for t in texts]
        stored_keys, stored = self.load()
        index = {k: i for i, k in enumerate(stored_keys.tolist())}
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k not in index and k not in missing:
                missing[k] = t
        if missing:
            new = np.asarray(compute_fn(list(missing.values())), np.float32)
            if new.ndim != 2 or new.shape[0] != len(missing):
                raise ValueError(f"compute_fn returned shape {new.shape} for {len(missing)} texts")
            # merge with whatever is on disk now (another process may have written meanwhile)
            stored_keys, stored = self.load()
            if stored.size and stored.shape[1] != new.shape[1]:
                raise ValueError(f"cached width {stored.shape[1]} != computed width {new.shape[1]}")
            index = {k: i for i, k in enumerate(stored_keys.tolist())}
            miss_keys = list(missing)
            add = [j for j, k in enumerate(miss_keys) if k not in index]
            add_keys = np.array([miss_keys[j] for j in add], "S64")
            stored_keys = np.concatenate([stored_keys.astype("S64"), add_keys])
            stored = np.concatenate([stored.reshape(-1, new.shape[1]), new[add]]) if add else stored
            self._save(stored_keys, stored)
            index = {k: i for i, k in enumerate(stored_keys.tolist())}
        if not texts:
            return np.zeros((0, stored.shape[1] if stored.ndim == 2 else 0), np.float32)
        return stored[np.fromiter((index[k] for k in keys), np.int64, len(keys))]


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def embed_cached(
    encoder: Any,
    texts: Sequence[str],
    max_length: int | None = None,
    truncation_side: str = "left",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """``encoder.embed`` through the on-disk cache: texts (N) -> [N, H] float32."""
    max_length = encoder.max_length if max_length is None else int(max_length)
    cache = EmbeddingCache(encoder.identity, truncation_side, max_length, cache_dir)
    return cache.get_or_compute(
        texts,
        lambda miss: encoder.embed(
            miss, batch_size=batch_size, max_length=max_length, truncation_side=truncation_side, progress=progress
        ),
    )

"""The frozen lower layers of a fine-tuned encoder: hidden states computed once per (encoder, setting, text).

    prompts --the encoder's first n_lower layers--> h [N, L_i, H] (ragged: real tokens only, float16)

``lower_hidden`` runs them (bucketed batches) through ``HiddenCache``: ragged states under
``<cache>/hidden/<setting-hash>/store.npz``, keyed by text like the embedding cache (``cache.py``).
Exact for the top layers that ``finetune.py`` trains, because padded keys get zero attention
weight and are left out of the mean pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mixllm_jax.text import cache as cache_mod
from mixllm_jax.text.bert import BertEncoder
from mixllm_jax.text.encoder import Encoder
from mixllm_jax.text.tokens import LENGTH_BUCKETS, pad_batch, padded_length


class HiddenCache:
    """Hidden states after the first `n_lower` layers, ragged over real tokens, float16, on disk.

    ``store.npz``: keys [M] (sha256 of each text), offsets [M + 1] int64, hidden [T, H] float16 (rows
    offsets[i]:offsets[i+1] are text i's tokens). Merged and replaced atomically like cache.py.
    """

    def __init__(self, identity: Mapping[str, Any], n_lower: int, truncation_side: str, max_length: int,
                 cache_dir: str | Path | None = None):
        ident = {k: identity[k] for k in cache_mod.IDENTITY_KEYS if k in identity}
        self.setting = {"encoder": ident, "lower_layers": int(n_lower), "truncation_side": str(truncation_side),
                        "max_length": int(max_length), "dtype": "float16"}
        h = hashlib.sha256(json.dumps(self.setting, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(cache_dir or cache_mod.default_cache_dir()) / "hidden" / h
        self.path = self.dir / "store.npz"

    def load(self):
        if not self.path.is_file():
            return np.zeros((0,), "S64"), np.zeros((1,), np.int64), None
        with np.load(self.path, allow_pickle=False) as z:
            return z["keys"], z["offsets"], z["hidden"]

    def get_or_compute(self, texts: Sequence[str], compute_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """texts (N) -> (hidden [T, H] float16, start [N], length [N]): text i's tokens are
        hidden[start[i] : start[i] + length[i]]. compute_fn(missing texts) -> (hidden [T', H], lengths)."""
        keys = [cache_mod.text_key(t) for t in texts]
        s_keys, offs, hid = self.load()
        index = {k: i for i, k in enumerate(s_keys.tolist())}
        missing = {}
        for k, t in zip(keys, texts):
            if k not in index and k not in missing:
                missing[k] = t
        if missing:
            new_h, new_len = compute_fn(list(missing.values()))
            s_keys, offs, hid = self.load()  # merge with what is on disk now
            index = {k: i for i, k in enumerate(s_keys.tolist())}
            new_off = np.concatenate([[0], np.cumsum(new_len)])
            add = [j for j, k in enumerate(missing) if k not in index]
            parts = [hid] if hid is not None else []
            lens = []
            for j in add:
                parts.append(new_h[new_off[j]: new_off[j + 1]])
                lens.append(new_len[j])
            hid = np.concatenate(parts).astype(np.float16) if parts else np.zeros((0, new_h.shape[1]), np.float16)
            offs = np.concatenate([offs, offs[-1] + np.cumsum(np.asarray(lens, np.int64))]).astype(np.int64)
            miss_keys = list(missing)
            s_keys = np.concatenate([s_keys.astype("S64"), np.array([miss_keys[j] for j in add], "S64")])
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.is_file():
                cache_mod._atomic_write(meta, lambda f: f.write(json.dumps(self.setting, indent=1).encode()))
            cache_mod._atomic_write(self.path, lambda f: np.savez(f, keys=s_keys, offsets=offs, hidden=hid))
            index = {k: i for i, k in enumerate(s_keys.tolist())}
        rows = np.fromiter((index[k] for k in keys), np.int64, len(keys))
        return hid, offs[rows], offs[rows + 1] - offs[rows]


def _lower_apply(config, n_lower: int):
    cfg = dataclasses.replace(config, num_hidden_layers=n_lower)

    @jax.jit
    def f(params, ids, mask):
        return BertEncoder(cfg).apply({"params": params}, ids, mask)

    return f


def lower_hidden(encoder: Encoder, texts: Sequence[str], n_lower: int, max_length: int, truncation_side: str,
                 batch_size: int = 64, cache_dir=None, use_cache: bool = True, progress: bool = False):
    """Hidden states of texts after the encoder's first n_lower layers: (hidden [T, H] float16,
    start [N], length [N]) as HiddenCache.get_or_compute; through the disk cache unless use_cache is False."""
    n = encoder.config.num_hidden_layers
    params = dict(encoder.params)
    params["layers"] = jax.tree.map(lambda a: a[:n_lower], encoder.params["layers"])
    fn = _lower_apply(encoder.config, n_lower)

    def compute(miss: list[str]):
        seqs = encoder.encode_ids(miss, max_length, truncation_side)
        lengths = np.array([len(s) for s in seqs], np.int64)
        order = np.argsort(-lengths, kind="stable")
        offs = np.concatenate([[0], np.cumsum(lengths)])
        out = np.zeros((int(offs[-1]), encoder.hidden_size), np.float16)
        starts = range(0, len(seqs), batch_size)
        if progress:
            from mixllm_jax.util import progress as progress_mod
            starts = progress_mod.bar(starts, total=math.ceil(len(seqs) / batch_size), desc="lower layers", unit="batch")
        for s in starts:
            rows = order[s: s + batch_size]
            length = padded_length(int(lengths[rows[0]]), max_length, LENGTH_BUCKETS)
            ids, mask, _ = pad_batch([seqs[i] for i in rows], length, batch_size, encoder.pad_id)
            h = np.asarray(fn(params, ids, mask))
            for j, i in enumerate(rows):
                out[offs[i]: offs[i + 1]] = h[j, : lengths[i]]
        return out, lengths

    texts = list(texts)
    if not use_cache:
        h, lengths = compute(texts)
        return h, np.concatenate([[0], np.cumsum(lengths)])[:-1], lengths
    return HiddenCache(encoder.identity, n_lower, truncation_side, max_length, cache_dir).get_or_compute(texts, compute)

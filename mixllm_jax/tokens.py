"""Tokenising and padding: the one path from texts to the padded arrays an encoder call takes.

    texts --encode (the encoder's `tokenizers` backend, untruncated, with special tokens)--> ids per text
          --truncate(max_length, side: keep [CLS] first and [SEP] last)--> ids per text
          --pad_batch to [bucket(N), padded_length(longest)]--> ids [B, L], mask [B, L], n_tokens [B]

Used by ``encoder.Encoder`` (embedding), ``router.Router`` (the fused text-to-decision path) and the
server (``serve.service``). One batch-size scheme, ``bucket`` over ``BATCH_BUCKETS`` (capped at a
serving batch limit with ``top``), serves every padded batch (encoder, ``engine``, ``simulate``, the
server), so the number of compilations stays bounded. Padding rows have an all-zero mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

BATCH_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192)  # padded batch sizes (past the last: its multiples)
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)  # padded token lengths (capped at max_length)


def bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS, top: int | None = None) -> int:
    """The padded size of a batch of n: the smallest of the (ascending) buckets >= n, past the largest
    the next multiple of it; with `top` (a serving batch limit) at most max(top, n)."""
    size = next((int(b) for b in buckets if n <= b), None)
    if size is None:
        size = -(-n // buckets[-1]) * int(buckets[-1])
    return size if top is None else min(size, max(int(top), n))


def pad_rows(a: np.ndarray, size: int, value=0) -> np.ndarray:
    """a [n, ...] -> [size, ...], rows n..size-1 filled with `value`."""
    return np.pad(a, [(0, size - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=value)


def padded_length(longest: int, max_length: int, length_buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """Token length of a padded batch: smallest bucket >= longest, capped at max_length."""
    fits = [b for b in length_buckets if longest <= b <= max_length]
    return int(min(fits)) if fits else int(max_length)


def pad_batch(seqs: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad token id lists to ids [batch, length] int32, mask [batch, length] int32, n_tokens [batch].

    Rows past ``len(seqs)`` are padding rows (all-zero mask, n_tokens 0).
    """
    if len(seqs) > batch:
        raise ValueError(f"{len(seqs)} sequences do not fit a batch of {batch}")
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    n_tokens = np.zeros((batch,), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence of {len(s)} tokens does not fit length {length}")
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
        n_tokens[i] = len(s)
    return ids, mask, n_tokens


def truncate(ids: list[int], max_length: int, side: str) -> list[int]:
    """Cut a token id list (with [CLS] first and [SEP] last) to max_length, keeping both specials:
    side "left" drops tokens from the start of the text, "right" from its end."""
    if len(ids) <= max_length:
        return ids
    if side == "left":
        return ids[:1] + ids[len(ids) - max_length + 1:]
    return ids[: max_length - 1] + ids[-1:]


def backend(tokenizer: Any):
    """A `tokenizers.Tokenizer` copy of a transformers fast tokenizer (or ``StaticTokenizer``) without
    truncation or padding: ``encode`` with it gives every token of a text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def encode(tok, texts: Sequence[str]) -> list[list[int]]:
    """Untruncated token ids (with special tokens) of each text, from a ``backend``."""
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=True)]


def batch(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int, length_buckets: Sequence[int] = LENGTH_BUCKETS,
          batch_buckets: Sequence[int] = BATCH_BUCKETS, top: int | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated id lists (N, each <= max_length) -> ids [B, L], mask [B, L], n_tokens [B] with
    B = bucket(N, batch_buckets, top) and L = padded_length(longest, max_length, length_buckets)."""
    length = padded_length(max((len(s) for s in seqs), default=1), max_length, length_buckets)
    return pad_batch(seqs, length, bucket(max(len(seqs), 1), batch_buckets, top), pad_id)

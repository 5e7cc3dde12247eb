"""Tokenising and padding: the one path from texts to the padded arrays an encoder call takes.

    texts --encode (the encoder's `tokenizers` backend, untruncated, with special tokens)--> ids per text
          --truncate(max_length, side: keep [CLS] first and [SEP] last)--> ids per text
          --pad_batch to [bucket(N), padded_length(longest)]--> ids [B, L], mask [B, L], n_tokens [B]

Used by ``encoder.Encoder`` (embedding), ``router.Router`` (the fused text-to-decision path) and the
server (``serve.service``). Batch sizes follow the one scheme of ``core.padding`` (``bucket`` over
``BATCH_BUCKETS``); token lengths ``LENGTH_BUCKETS``. Padding rows have an all-zero mask.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Sequence

import numpy as np

from mixllm_jax.core.padding import BATCH_BUCKETS, bucket

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)  # padded token lengths (capped at max_length)


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


def backend(tokenizer: Any) -> "Backend":
    """The encoding backend of a transformers fast tokenizer (or ``StaticTokenizer``): a
    `tokenizers.Tokenizer` copy without truncation or padding, so ``encode`` gives every token of a
    text, with the exact ASCII fast path (``FastWordPiece``) when the tokenizer is BERT's kind."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return Backend(tok)


class Backend:
    """A `tokenizers.Tokenizer` (no truncation, no padding) and, for a BERT WordPiece tokenizer, its
    ``FastWordPiece``: ASCII texts go through the fast path, the others through the tokenizer."""

    def __init__(self, tok):
        self.tokenizer = tok
        self.fast = FastWordPiece.build(tok)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        out: list = [None] * len(texts)
        slow = []
        for i, t in enumerate(texts):
            ids = self.fast.encode(t) if self.fast is not None else None
            if ids is None:
                slow.append(i)
            else:
                out[i] = ids
        if slow:
            for i, e in zip(slow, self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=True)):
                out[i] = e.ids
        return out


class FastWordPiece:
    """The ids a BERT WordPiece tokenizer (BertNormalizer with clean_text, BertPreTokenizer, WordPiece,
    [CLS] $A [SEP]) gives an ASCII text, identical, ~10x faster than `tokenizers` on long prompts.

    On ASCII text BERT's normalization is: drop control characters but tab, newline and carriage
    return (which become spaces), lowercase (when the normalizer does); its pre-tokenization splits
    at whitespace and isolates each punctuation character (the words are the runs of letters and
    digits, and every other printable character alone). So the text is split at whitespace
    (str.split) and each chunk's ids -- its words' WordPiece ids from the tokenizer's own model
    (`Model.tokenize`) -- are memoized in a bounded dict: a text costs a split and a lookup per
    chunk. Texts that are not ASCII, or hold an added token's text (``[SEP]``, ...), are not
    handled (``encode`` returns None). ``build`` returns None for any other kind of tokenizer, or
    when a probe text does not come out as the tokenizer's own ids.
    """

    MEMO_LIMIT = 1 << 16  # chunks memoized at most (then the memo starts again)
    _CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
    _CLEAN = {**{c: None for c in [*range(32), 127]}, 9: 32, 10: 32, 13: 32}
    PROBE = ("Hello, World!  It's 3.14\tpi\r\n\x01x\x7fy \x0bz\x0c--(don't) UNAFFABLE 12ab " + "a" * 101
             + " \x00 ~`|{}^_@")

    def __init__(self, tok, lowercase: bool, specials: tuple[int, int], added: list[str]):
        self.model = tok.model
        self.lowercase = lowercase
        self.cls, self.sep = specials
        self._words = re.compile(r"[0-9a-z]+|[^0-9a-z\s]" if lowercase else r"[0-9A-Za-z]+|[^0-9A-Za-z\s]")
        self._added = re.compile("|".join(re.escape(a) for a in added), re.IGNORECASE) if added else None
        self.memo = _ChunkMemo(self._pieces, self.MEMO_LIMIT)  # whitespace-free chunk -> ids

    @classmethod
    def build(cls, tok) -> "FastWordPiece | None":
        """The fast path of `tok` (a `tokenizers.Tokenizer`), or None when it is not BERT's kind or
        the probe texts do not come out identical."""
        cfg = json.loads(tok.to_str())
        norm, pre, model, post = (cfg.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model", "post_processor"))
        if (norm.get("type") != "BertNormalizer" or not norm.get("clean_text") or pre.get("type") != "BertPreTokenizer"
                or model.get("type") != "WordPiece" or post.get("type") not in ("TemplateProcessing", "BertProcessing")):
            return None
        specials = tok.encode("", add_special_tokens=True).ids
        if len(specials) != 2 or tok.encode("", add_special_tokens=False).ids:
            return None
        fast = cls(tok, bool(norm.get("lowercase")), tuple(specials), [a["content"] for a in cfg.get("added_tokens", [])])
        for p in (cls.PROBE, "", " ", "A.B"):
            if fast.encode(p) != tok.encode(p, add_special_tokens=True).ids:
                return None
        fast.memo.clear()
        return fast

    def _pieces(self, chunk: str) -> tuple:
        """The ids of a whitespace-free chunk of normalized text: its words' WordPiece ids."""
        return tuple(t.id for w in self._words.findall(chunk) for t in self.model.tokenize(w))

    def encode(self, text: str) -> list[int] | None:
        """Every id of `text` with [CLS] first and [SEP] last; None when the text is not handled."""
        if not text.isascii() or (self._added is not None and self._added.search(text)):
            return None
        if self._CONTROL.search(text):
            text = text.translate(self._CLEAN)
        if self.lowercase:
            text = text.lower()
        return [self.cls, *itertools.chain.from_iterable(map(self.memo.__getitem__, text.split())), self.sep]


class _ChunkMemo(dict):
    """chunk -> its ids, computed on a miss (`pieces`); keeps chunks of at most MAX_CHARS characters,
    at most `limit` of them (then it starts again): ~10 MB at most."""

    MAX_CHARS = 64

    def __init__(self, pieces, limit: int):
        super().__init__()
        self.pieces, self.limit = pieces, limit

    def __missing__(self, chunk: str) -> tuple:
        ids = self.pieces(chunk)
        if len(chunk) <= self.MAX_CHARS:  # a long chunk is rare, and would hold memory: not kept
            if len(self) >= self.limit:
                self.clear()
            self[chunk] = ids
        return ids


def encode(tok, texts: Sequence[str]) -> list[list[int]]:
    """Untruncated token ids (with special tokens) of each text, from a ``backend`` (or a
    `tokenizers.Tokenizer` without truncation, which is made one)."""
    return (tok if isinstance(tok, Backend) else Backend(tok)).encode(texts)


def batch(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int, length_buckets: Sequence[int] = LENGTH_BUCKETS,
          batch_buckets: Sequence[int] = BATCH_BUCKETS, top: int | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated id lists (N, each <= max_length) -> ids [B, L], mask [B, L], n_tokens [B] with
    B = bucket(N, batch_buckets, top) and L = padded_length(longest, max_length, length_buckets)."""
    length = padded_length(max((len(s) for s in seqs), default=1), max_length, length_buckets)
    return pad_batch(seqs, length, bucket(max(len(seqs), 1), batch_buckets, top), pad_id)

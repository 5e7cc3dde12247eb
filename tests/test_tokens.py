"""tokens: the one tokenise-truncate-pad path; core.padding: the one batch bucket scheme and row padding."""
import jax.numpy as jnp
import numpy as np
import pytest

from mixllm_jax.core import padding
from mixllm_jax.text import tokens


def test_bucket_ladder_multiples_and_serving_cap():
    assert [padding.bucket(n) for n in (1, 2, 8, 9, 8192, 8193)] == [1, 8, 8, 32, 8192, 16384]
    assert padding.bucket(9, top=16) == 16 and padding.bucket(40, top=64) == 64  # capped at the batch limit
    assert padding.bucket(100, top=64) == 100  # never below n
    assert padding.bucket(5, (1, 3)) == 6


def test_pad_rows():
    a = np.arange(6).reshape(3, 2)
    out = padding.pad_rows(a, 5, value=-1)
    assert isinstance(out, np.ndarray) and out.shape == (5, 2) and (out[:3] == a).all() and (out[3:] == -1).all()
    cols = padding.pad_rows(a, 4, axis=1)
    assert cols.shape == (3, 4) and (cols[:, :2] == a).all() and (cols[:, 2:] == 0).all()
    on_device = padding.pad_rows(jnp.asarray(a), 5)  # a JAX array stays one (inside a jit too)
    assert not isinstance(on_device, np.ndarray) and (np.asarray(on_device)[3:] == 0).all()


def test_truncate_keeps_specials_both_sides():
    ids = [101, 1, 2, 3, 4, 5, 102]
    assert tokens.truncate(ids, 4, "left") == [101, 4, 5, 102]
    assert tokens.truncate(ids, 4, "right") == [101, 1, 2, 102]
    assert tokens.truncate(ids, 7, "left") == ids


def test_batch_pads_to_buckets():
    ids, mask, n = tokens.batch([[101, 7, 102], [101, 102]], max_length=64, pad_id=0, length_buckets=(16, 32))
    assert ids.shape == (8, 16) and mask.sum() == 5 and list(n[:3]) == [3, 2, 0]
    ids, _, _ = tokens.batch([[1] * 20], max_length=24, pad_id=0, length_buckets=(16, 32), top=1)
    assert ids.shape == (1, 24)
    with pytest.raises(ValueError, match="does not fit"):
        tokens.pad_batch([[1, 2, 3]], 2, 1)


def test_truncate_equals_the_tokenizers_truncation():
    """The one path (encode untruncated, then truncate) gives the ids the tokenizer's own truncation gives."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate("abcdefgh")}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    text = "a b c d e f g h"
    full = tokens.encode(tok, [text])[0]
    assert len(full) == 10
    for side in ("left", "right"):
        tok.enable_truncation(5, direction=side)
        assert tokens.truncate(full, 5, side) == tok.encode(text).ids
    tok.no_truncation()


def _bert_tokenizer(lowercase=True):
    """A small BERT-style tokenizer: BertNormalizer, BertPreTokenizer, WordPiece, [CLS] $A [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["un", "##aff", "##able", "the", "cat", "##s", "run", "##ning", "3", "##14", "hello", "world", "x", "y"]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    punct = [chr(c) for c in range(33, 127) if not chr(c).isalnum()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters + ["##" + c for c in letters] + punct
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]",
                                     max_input_chars_per_word=12))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return tok


@pytest.mark.parametrize("lowercase", [True, False])
def test_fast_wordpiece_gives_the_tokenizers_ids(lowercase):
    """The ASCII fast path equals `tokenizers` on random text (controls, case, punctuation, long words,
    special-token text, non-ASCII), whichever path each text takes."""
    import random

    tok = _bert_tokenizer(lowercase)
    b = tokens.Backend(tok)
    assert b.fast is not None
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + ["[SEP]", "[mask]", "Unaffable", "cats", "é", "中", "\u00a0", "##", " "]
    texts = ["", " ", "Hello, WORLD!\r\n3.14 unaffable\x01cats\x7f", "a" * 13, "[CLS] x [SEP]"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    assert b.encode(texts) == [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
    assert b.fast.encode("naïve") is None and b.fast.encode("x [SEP] y") is None  # left to the tokenizer
    assert b.fast.encode("Unaffable!") == tok.encode("Unaffable!").ids


def test_fast_wordpiece_only_for_bert_tokenizers():
    """A tokenizer of another kind has no fast path (encode is the tokenizer's own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokens.FastWordPiece.build(tok) is None
    assert tokens.encode(tok, ["a b"]) == [[1, 0]]
    bert = _bert_tokenizer()
    bert.post_processor = None  # no [CLS] ... [SEP]: not the kind the fast path knows
    assert tokens.FastWordPiece.build(bert) is None


def test_fast_wordpiece_memo_is_bounded():
    tok = _bert_tokenizer()
    b = tokens.Backend(tok)
    b.fast.memo.limit = 3
    texts = [f"cat{i} run{i}x" for i in range(10)] + ["x" * 80]
    assert b.encode(texts) == [e.ids for e in tok.encode_batch(texts)]
    assert 0 < len(b.fast.memo) <= 3 and "x" * 80 not in b.fast.memo  # long chunks are not kept

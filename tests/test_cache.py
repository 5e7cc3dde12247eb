"""Tests of the on-disk embedding cache (mixllm_jax.text.cache)."""

import numpy as np
import pytest

from mixllm_jax.text.cache import EmbeddingCache, default_cache_dir, embed_cached

IDENT = {"name": "fake/encoder", "path": "/somewhere", "hidden_size": 4, "model_bytes": 123}


class FakeEmbed:
    """compute_fn that records its calls; embedding = (len, first char code, salt, 1)."""

    def __init__(self, salt=0.0):
        self.calls, self.salt = [], salt

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.array([[len(t), ord(t[0]) if t else 0, self.salt, 1] for t in texts], np.float32)


def test_second_call_does_not_recompute(tmp_path):
    f = FakeEmbed()
    texts = ["alpha", "beta", "alpha", "gamma"]
    first = EmbeddingCache(IDENT, "left", 128, tmp_path).get_or_compute(texts, f)
    assert f.calls == [["alpha", "beta", "gamma"]]  # duplicates computed once
    np.testing.assert_array_equal(first, f(texts))
    f.calls.clear()
    cache = EmbeddingCache(IDENT, "left", 128, tmp_path)  # a fresh object reads from disk
    again = cache.get_or_compute(["gamma", "alpha"], f)
    assert f.calls == []
    np.testing.assert_array_equal(again, first[[3, 0]])
    mixed = cache.get_or_compute(["delta", "beta"], f)
    assert f.calls == [["delta"]]  # only the miss
    np.testing.assert_array_equal(mixed, f(["delta", "beta"]))
    assert len(cache) == 4
    assert not list(cache.dir.glob("*.tmp"))  # atomic writes leave no temporaries


def test_settings_do_not_collide(tmp_path):
    texts = ["same text"]
    settings = [
        (IDENT, "left", 128),
        (IDENT, "right", 128),
        (IDENT, "left", 256),
        ({**IDENT, "name": "other/encoder"}, "left", 128),
        ({**IDENT, "model_bytes": 124}, "left", 128),
    ]
    outs = []
    for salt, (ident, side, max_len) in enumerate(settings):
        f = FakeEmbed(salt)
        outs.append(EmbeddingCache(ident, side, max_len, tmp_path).get_or_compute(texts, f))
        assert len(f.calls) == 1, (ident, side, max_len)
    assert len({float(o[0, 2]) for o in outs}) == len(settings)
    # the path of the weights is not part of the key: moved weights still hit
    f = FakeEmbed(99)
    moved = EmbeddingCache({**IDENT, "path": "/elsewhere"}, "left", 128, tmp_path).get_or_compute(texts, f)
    assert f.calls == [] and moved[0, 2] == 0


def test_bad_compute_fn_and_env_default(tmp_path, monkeypatch):
    cache = EmbeddingCache(IDENT, "left", 128, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        cache.get_or_compute(["a", "b"], lambda t: np.zeros((1, 4)))
    assert len(cache) == 0
    monkeypatch.setenv("MIXLLM_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert EmbeddingCache(IDENT, "left", 128).dir.is_relative_to(tmp_path / "env")


def test_embed_cached_uses_encoder_identity(tmp_path):
    class FakeEncoder:
        identity, max_length = IDENT, 256

        def __init__(self):
            self.seen = []

        def embed(self, texts, batch_size, max_length, truncation_side, progress):
            self.seen.append((list(texts), max_length, truncation_side))
            return FakeEmbed()(texts)

    e = FakeEncoder()
    a = embed_cached(e, ["x", "yy"], cache_dir=tmp_path)
    b = embed_cached(e, ["yy", "x"], cache_dir=tmp_path)
    assert e.seen == [(["x", "yy"], 256, "left")]
    np.testing.assert_array_equal(a[::-1], b)
    embed_cached(e, ["x"], truncation_side="right", cache_dir=tmp_path)
    assert e.seen[-1] == (["x"], 256, "right")

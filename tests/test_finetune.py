"""Encoder fine-tuning (finetune.py): losses, LoRA merge, identity digest, cache keys, checkpoints."""

import json

import jax
import numpy as np
import pytest

from mixllm_jax.text import cache, finetune, hidden_cache
from mixllm_jax.text import encoder as enc_mod
from mixllm_jax.core.config import Budget, FinetuneConfig, HeadConfig, RouterConfig
from mixllm_jax.data import Dataset, ModelSpec

from test_encoder import tiny_bert_folder

H = 32
TINY = dict(model_type="bert", vocab_size=30522, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_act="gelu_new", max_position_embeddings=64, type_vocab_size=2,
            layer_norm_eps=1e-5)
WORDS = ("apple river stone cloud paper light music garden window number table yellow forest bottle "
         "engine silver summer planet letter doctor").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random 2-layer BERT in a folder (so a checkpoint can reload it by its path)."""
    folder = tiny_bert_folder(tmp_path_factory.mktemp("enc") / "tiny-bert", TINY, seed=1, prefix="", fresh=True)
    return enc_mod.load_encoder(str(folder), matmul_dtype="float32")  # exact comparisons below


def synthetic(n=240, seed=0):
    """Prompts of random words with one cue word ("red" or "blue") somewhere: LLM "a" answers the red
    ones, "b" the blue ones, "c" is always half right. Two domains that do not follow the cue."""
    rng = np.random.default_rng(seed)
    prompts, red = [], rng.random(n) < 0.5
    for i in range(n):
        words = list(rng.choice(WORDS, 4))
        words.insert(int(rng.integers(0, 5)), "red" if red[i] else "blue")
        prompts.append(" ".join(words))
    q = np.stack([red, ~red, np.full(n, 0.5)], 1).astype(np.float32)
    tags = [("math",) if i % 2 else ("code",) for i in range(n)]
    models = ["a", "b", "c"]
    ds = Dataset(query_ids=[f"q{i}" for i in range(n)], prompts=prompts, tags=tags, models=models, quality=q,
                 cost=np.tile(np.array([[1e-4, 1e-4, 1e-5]], np.float32), (n, 1)),
                 prompt_tokens=np.full(n, 20.0, np.float32), completion_tokens=np.full((n, 3), 10.0, np.float32),
                 split=["train"] * n, latency_s=None,
                 specs=[ModelSpec(m, 1.0 if m != "c" else 0.1, 1.0 if m != "c" else 0.1) for m in models], report={})
    return ds, red


def fisher(e, labels):
    """Separation of two groups along the difference of their means (between / within spread)."""
    d = e[labels].mean(0) - e[~labels].mean(0)
    u = d / np.linalg.norm(d)
    p = e @ u
    return abs(p[labels].mean() - p[~labels].mean()) / np.sqrt(0.5 * (p[labels].var() + p[~labels].var()))


def test_outcome_masks_ties_and_missing():
    q = np.array([[1, 1, 0, 0, 1], [0.9, 0.5, 0.1, 0.3, 0.7], [1, 1, 1, 1, 1], [np.nan, 0.2, 0.8, np.nan, 0.5]])
    pos, neg = finetune.outcome_masks(q, top_k=2, bottom_k=2)
    np.testing.assert_array_equal(pos, [[1, 1, 0, 0, 1], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(neg, [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])


def test_lora_merge_equals_adapted_forward(tiny):
    """The merged kernels W + s A B give the embeddings the adapters gave in training; zero B is the base."""
    layers = jax.tree.map(lambda a: a[1:], tiny.params["layers"])
    lora = finetune._init_lora(layers, ("query", "value", "intermediate"), 4, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 16, H)).astype(np.float32)
    mask = (np.arange(16)[None] < np.array([[16], [9], [3]])).astype(np.int32)
    base = finetune.top_embed(layers, None, h, mask, tiny.config)
    np.testing.assert_allclose(finetune.top_embed(layers, lora, h, mask, tiny.config, 2.0), base, atol=1e-6)
    lora = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), lora)
    adapted = finetune.top_embed(layers, lora, h, mask, tiny.config, 2.0)
    merged = finetune.top_embed(finetune.merge_lora(layers, lora, 2.0), None, h, mask, tiny.config)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
    np.testing.assert_allclose(merged, adapted, atol=2e-5)


def test_top_layers_on_cached_hidden_states_match_the_encoder(tiny, tmp_path):
    """Lower layers cached ragged (float16) + the top layer = the full encoder's embedding."""
    texts = ["hello world", "a second, somewhat longer sentence about rivers", "x"]
    hid, start, length = hidden_cache.lower_hidden(tiny, texts, 1, 64, "left", cache_dir=tmp_path)
    again = hidden_cache.lower_hidden(tiny, texts[::-1], 1, 64, "left", cache_dir=tmp_path)  # from the cache
    np.testing.assert_array_equal(again[2], length[::-1])
    layers = jax.tree.map(lambda a: a[1:], tiny.params["layers"])
    L = int(length.max())
    h = np.zeros((3, L, H), np.float32)
    mask = np.zeros((3, L), np.int32)
    for i in range(3):
        h[i, : length[i]] = hid[start[i]: start[i] + length[i]]
        mask[i, : length[i]] = 1
    got = np.asarray(finetune.top_embed(layers, None, h, mask, tiny.config))
    want = tiny.embed(texts, max_length=64)
    np.testing.assert_allclose(got, want, atol=3e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "top"])
def test_loss_decreases_and_embeddings_learn_the_cue(tiny, tmp_path, method):
    ds, red = synthetic()
    cfg = FinetuneConfig(method=method, rank=4, epochs=8, batch_size=32, patience=8, learning_rate=3e-3)
    before = tiny.embed(ds.prompts, max_length=64)
    ft = finetune.finetune_encoder(tiny, ds, cfg, max_length=64, cache_dir=tmp_path, progress=False)
    hist = ft.finetune_report["history"]
    assert hist[-1]["train"]["loss"] < 0.7 * hist[0]["train"]["loss"]
    assert min(h["val"]["loss"] for h in hist) < hist[0]["val"]["loss"]
    assert min(h["train"]["contrastive"] for h in hist) < 0.8 * hist[0]["train"]["contrastive"]
    after = ft.embed(ds.prompts, max_length=64)
    assert fisher(after, red) > 1.5 * fisher(before, red)
    # a new identity: base weights below the fine-tuned layer, different digest, cache group apart
    assert ft.identity["finetune_layers"] == 1 and len(ft.identity["finetune"]) == 16
    assert not finetune.is_finetuned(tiny) and finetune.is_finetuned(ft)
    for a, b in zip(jax.tree.leaves(tiny.params["layers"]), jax.tree.leaves(ft.params["layers"])):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    base_cache = cache.EmbeddingCache(tiny.identity, "left", 64, tmp_path)
    ft_cache = cache.EmbeddingCache(ft.identity, "left", 64, tmp_path)
    assert base_cache.dir != ft_cache.dir
    # splice: the saved top layers on the base weights give the same encoder back
    back = finetune.splice(tiny, finetune.top_layers(ft), ft.identity)
    assert back.identity == ft.identity
    np.testing.assert_allclose(back.embed(ds.prompts[:8], max_length=64), after[:8], atol=1e-6)


def test_digest_depends_on_the_weights(tiny):
    layers = finetune.top_layers(finetune._finetuned_encoder(tiny, jax.tree.map(lambda a: np.asarray(a)[1:],
                                                                                tiny.params["layers"])))
    d0 = finetune.digest(tiny.identity, 1, layers["layers"])
    bumped = jax.tree.map(np.copy, layers["layers"])
    bumped["query"]["bias"][0, 0] += 1e-3
    assert finetune.digest(tiny.identity, 1, bumped) != d0
    assert finetune.digest(tiny.identity, 0, layers["layers"]) != d0
    other = dict(tiny.identity, model_bytes=tiny.identity["model_bytes"] + 1)
    assert finetune.digest(other, 1, layers["layers"]) != d0
    with pytest.raises(ValueError, match="digest"):
        finetune.splice(tiny, {"layers": bumped}, {**tiny.identity, "finetune": d0, "finetune_layers": 1})


def test_config_round_trip_and_checks():
    cfg = RouterConfig(finetune=FinetuneConfig(method="top", layers=2, lora_targets=("query", "value")))
    back = RouterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.finetune.lora_targets, tuple)
    d = RouterConfig().to_dict()
    d.pop("finetune")  # a config saved before fine-tuning existed
    assert RouterConfig.from_dict(d).finetune is None
    for bad in ({"method": "full"}, {"layers": 0}, {"lora_targets": ("pooler",)},
                {"contrastive": 0.0, "sample": 0.0, "regression": 0.0}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)


@pytest.mark.slow
def test_finetuned_router_save_restore_same_decisions(tiny, tmp_path, monkeypatch):
    from mixllm_jax.store import checkpoint
    from mixllm_jax.offline import train

    monkeypatch.setenv("MIXLLM_CACHE", str(tmp_path / "cache"))
    ds, _ = synthetic(120, seed=3)
    config = RouterConfig(max_length=64, head=HeadConfig(hidden=16, features=8, epochs=5, batch_size=32),
                          ridges=(1.0, 10.0), folds=2, budget=Budget("cost_weight", 100.0),
                          finetune=FinetuneConfig(rank=2, epochs=2, batch_size=32))
    router = train.train_router(ds, ds.specs, tiny, config, progress=False)
    assert finetune.is_finetuned(router.encoder)
    prompts = ds.prompts[:20] + ["blue apple river", "red stone"]
    want = router.route(prompts)
    step = checkpoint.save_router(router, tmp_path / "ck")
    meta = checkpoint.read_metadata(tmp_path / "ck")
    assert meta["encoder"]["finetune"] == router.encoder.identity["finetune"]
    back, _ = checkpoint.restore_router(tmp_path / "ck", step=step)
    assert back.encoder.identity == router.encoder.identity
    assert back.config.finetune == config.finetune
    got = back.route(prompts)
    assert [r.model for r in got] == [r.model for r in want]
    for a, b in zip(got, want):
        assert a.score == b.score
    # restoring onto the base encoder object splices the saved layers in
    back2, _ = checkpoint.restore_router(tmp_path / "ck", step=step, encoder=tiny)
    assert back2.encoder.identity == router.encoder.identity
    assert [r.model for r in back2.route(prompts)] == [r.model for r in want]
    # embeddings of the fine-tuned encoder must not be taken for base ones (and vice versa)
    e_ft = train.embed(router.encoder, ds.select(np.arange(5)), 64)
    e_base = train.embed(tiny, ds.select(np.arange(5)), 64)
    assert np.abs(e_ft - e_base).max() > 1e-4

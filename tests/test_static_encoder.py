"""The static encoder tier (mixllm_jax.text.static_encoder, static_distill): distillation on a tiny random BERT, saving and
loading, the weighted-mean embedding, the fused text-to-decision paths, compile counts, and the
persistent compilation cache."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixllm_jax.core import bandit
from mixllm_jax.text import bert, cache, encoder as enc_mod, static_distill as D
from mixllm_jax import cli
from mixllm_jax.core.config import RouterConfig
from mixllm_jax.data import ModelSpec
from mixllm_jax.core.policy import Policy, route_batch
from mixllm_jax.text.router import Router, featurize, route_text_batch
from mixllm_jax.core.state import with_bias
from mixllm_jax.offline.train import new_state

from test_encoder import tiny_bert_folder

TEXTS = ["Write a Python function that reverses a list.", "What is the capital of France?",
         "Solve 3x + 5 = 20 for x.", "hello", ""]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def distilled(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    cfg = D.distill(out, str(tiny_bert), dims=16, batch_size=4096, progress=False)
    return out, cfg


def numpy_embed(folder, ids_rows):
    """The reference: normalized weighted mean of the rows' token vectors, in float64."""
    from safetensors.numpy import load_file

    t = load_file(str(folder / "model.safetensors"))
    E, w = t["embeddings"].astype(np.float64), t["weights"].astype(np.float64)
    out = []
    for ids in ids_rows:
        ws = w[ids]
        e = (ws[:, None] * E[ids]).sum(0) / max(ws.sum(), 1e-9)
        n = np.linalg.norm(e)
        out.append(e / n if n > 1e-12 else e)
    return np.array(out)


def test_distill_writes_a_loadable_folder(distilled, tiny_bert):
    out, cfg = distilled
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert json.loads((out / "config.json").read_text()) == cfg
    assert cfg["model_type"] == "static" and cfg["vocab_size"] == 30522 and cfg["hidden_size"] == 16
    assert 0.0 < cfg["explained_variance"] <= 1.0 and cfg["weighting"] == "zipf"
    enc = enc_mod.load_encoder(f"static:{out}")
    assert enc.kind == "static" and enc.hidden_size == 16 and enc.identity["kind"] == "static"
    assert enc.identity["name"] == f"static:{out.resolve()}" and len(enc.identity["digest"]) == 16
    assert enc_mod.load_encoder(str(out)).kind == "static"  # a static folder is recognised without the prefix
    w = np.asarray(enc.params["weights"])
    special = [enc.tokenizer.pad_token_id, enc.tokenizer.cls_token_id, enc.tokenizer.sep_token_id,
               enc.tokenizer.unk_token_id, enc.tokenizer.mask_token_id]
    assert (w[special] == 0).all()
    np.testing.assert_allclose(w[2000], np.log(2001), rtol=1e-6)  # log(1 + rank), rank = vocabulary order


def test_token_vectors_are_the_transformers_mean_pool(tiny_bert):
    """Each token's vector is the unnormalised mean of [CLS] tok [SEP]'s last hidden states."""
    src = enc_mod.load_encoder(str(tiny_bert))
    vecs = D.token_vectors(src, batch_size=8192, progress=False)
    assert vecs.shape == (30522, 32)
    toks = [0, 1996, 7592, 30521]
    ids = np.array([[101, t, 102] for t in toks], np.int32)
    hidden = bert.BertEncoder(src.config).apply({"params": src.params}, ids, np.ones_like(ids))
    np.testing.assert_allclose(vecs[toks], np.asarray(hidden).mean(1), atol=1e-5)


def test_pca_keeps_the_top_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * np.array([10, 5, 2, 1, 0.1, 0.01])
    y, ratio = D.pca(x, 3)
    assert y.shape == (500, 3) and ratio.shape == (3,) and (np.diff(ratio) <= 0).all()
    np.testing.assert_allclose(np.abs(y), np.abs(x[:, :3] - x[:, :3].mean(0)), rtol=0.05, atol=0.5)
    full, r = D.pca(x, 99)  # more dims than axes: a rotation, distances kept
    assert full.shape == (500, 6) and np.isclose(r.sum(), 1.0)
    xc = x - x.mean(0)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), np.linalg.norm(xc, axis=1), rtol=1e-5)


def test_token_weights():
    w = D.token_weights(10, [0, 3])
    assert w[0] == w[3] == 0 and np.isclose(w[9], np.log(10))
    sif = D.token_weights(10, [0], "sif")
    assert sif[0] == 0 and (np.diff(sif[1:]) > 0).all() and (sif[1:] < 1).all()
    assert (D.token_weights(4, [], "none") == 1).all()
    with pytest.raises(ValueError, match="weighting"):
        D.token_weights(4, [], "idf")


def test_embedding_is_the_numpy_weighted_mean(distilled):
    out, _ = distilled
    enc = enc_mod.load_encoder(f"static:{out}")
    got = enc.embed(TEXTS, max_length=64)
    seqs = enc.encode_ids(TEXTS, max_length=64)
    want = numpy_embed(out, seqs)
    assert got.shape == (len(TEXTS), 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got[:-1], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(got[-1], 0.0)  # "" is [CLS] [SEP] only: weight 0, zero vector (no NaN)
    # no position embeddings: a text longer than the transformer's 512 positions is fine, max_length still cuts
    long = " ".join(["routing"] * 1500)
    assert enc.tokenize([long], max_length=2048)[0].shape[1] == 2048
    one = enc.embed([long], max_length=2048)
    np.testing.assert_allclose(one, numpy_embed(out, enc.encode_ids([long], max_length=2048)), atol=2e-5)  # f32 sum


def test_static_compile_counts(distilled):
    out, _ = distilled
    enc = enc_mod.load_encoder(f"static:{out}")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], size=k)) for k in rng.permutation(np.arange(1, 41))]
    before = enc.num_traces
    enc.embed(texts, batch_size=8, max_length=64)
    first = enc.num_traces - before
    assert 1 <= first <= 6  # length buckets 16/32/64 x batch sizes {1, 8}
    enc.embed([t + " epsilon" for t in texts], batch_size=8, max_length=64)
    assert enc.num_traces - before == first


def _router(enc, K=3, seed=0):
    """A raw-feature router (no head) over K priced LLMs, each arm fitted on random observations."""
    d = enc.hidden_size + 1
    specs = [ModelSpec(f"m{k}", price_in_per_mtok=1.0 * (k + 1), price_out_per_mtok=2.0 * (k + 1)) for k in range(K)]
    state, reg = new_state(specs, d)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, d)).astype(np.float32) / np.sqrt(d)
    x[:, -1] = 1
    y = np.stack([rng.uniform(size=64), rng.uniform(3, 6, size=64)], 1).astype(np.float32)
    state = bandit.update_batch(state, jnp.asarray(x), jnp.asarray(rng.integers(0, K, 64).astype(np.int32)), jnp.asarray(y))
    return Router(encoder=enc, head=None, state=state, registry=reg,
                  policy=Policy(cost_weight=50.0, alpha=0.05, beta=0.0),
                  config=RouterConfig(head=None, features="raw", max_length=64))


def test_fused_static_path_equals_step_by_step(distilled):
    out, _ = distilled
    enc = enc_mod.load_encoder(f"static:{out}")
    router = _router(enc)
    texts = TEXTS[:4]
    d, domain, _ = router.decide(texts)
    assert domain is None
    ids, mask, pt = router.tokenize(texts)
    e = enc.embed_ids(ids, mask)
    np.testing.assert_allclose(np.asarray(e)[:4], enc.embed(texts, max_length=64), atol=1e-6)
    ref = route_batch(router.state, with_bias(e), pt, router.policy, np.arange(len(ids)) < 4)
    np.testing.assert_array_equal(np.asarray(d.arm), np.asarray(ref.arm))
    np.testing.assert_allclose(np.asarray(d.score), np.asarray(ref.score), atol=1e-5)
    routes = router.route(texts)
    assert [r.model for r in routes] == [f"m{int(a)}" for a in np.asarray(ref.arm)[:4]]
    # compile counts: another batch in the same (batch, length) buckets does not retrace
    n0 = route_text_batch._cache_size()
    router.decide(["another prompt", "and one more"])
    router.decide(["a third batch of two", "prompts"])
    assert route_text_batch._cache_size() - n0 <= 1


def test_route_text_batch_runs_the_static_encoder_with_serving_inputs(distilled):
    """The server's call: constraints and the feedback network's term on the static tier."""
    from mixllm_jax.core import feedback_net
    from mixllm_jax.core.policy import Constraints

    out, _ = distilled
    enc = enc_mod.load_encoder(f"static:{out}")
    router = _router(enc)
    ids, mask, pt = router.tokenize(TEXTS[:3])
    B, K = ids.shape[0], router.state.capacity
    fs = feedback_net.init_feedback(router.state.dim, K)
    d, domain, x = route_text_batch(enc.params, None, None, router.state, ids, mask, pt, router.policy,
                                    np.zeros(B, bool), None, Constraints.none(B, K), fs.params,
                                    enc_config=enc.config, head_shape=None, mode="raw")
    want, _ = featurize(enc.embed_ids(ids, mask), None, None, head_shape=None, mode="raw")
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-6)
    assert domain is None and np.asarray(d.arm).shape == (B,)
    np.testing.assert_allclose(np.asarray(d.bonus), np.asarray(feedback_net.bonus(fs, x)), atol=1e-6)


def test_cache_identity_follows_the_weights_not_the_folder(distilled, tmp_path):
    out, _ = distilled
    a = enc_mod.load_encoder(f"static:{out}")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    b = enc_mod.load_encoder(f"static:{moved}")
    assert a.identity["name"] != b.identity["name"]
    assert cache.EmbeddingCache(a.identity, "left", 128, tmp_path).dir == cache.EmbeddingCache(b.identity, "left", 128, tmp_path).dir
    minilm = {"name": "sentence-transformers/all-MiniLM-L6-v2", "hidden_size": 384, "model_bytes": 1}
    assert cache.EmbeddingCache(minilm, "left", 128, tmp_path).dir != cache.EmbeddingCache(a.identity, "left", 128, tmp_path).dir


def test_missing_static_folder_is_a_clear_error(tmp_path):
    with pytest.raises(enc_mod.EncoderNotFoundError, match="distill-encoder"):
        enc_mod.load_encoder(f"static:{tmp_path / 'nothing'}")


@pytest.fixture
def restore_jax_cache_config():
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
              jax.config.jax_persistent_cache_min_entry_size_bytes)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", before[2])


def test_persistent_compilation_cache_is_configured(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.setenv("MIXLLM_CACHE", str(tmp_path))
    assert cache.compilation_cache_dir() == tmp_path / "jax"
    assert cache.enable_compilation_cache() == tmp_path / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    assert jax.config.jax_persistent_cache_min_compile_time_secs <= 0.1
    monkeypatch.setenv("MIXLLM_COMPILATION_CACHE", "off")
    assert cache.enable_compilation_cache(tmp_path / "elsewhere") is None
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    # the CLI turns it on for route, train, eval and run (serve: its --compilation-cache, default 'auto')
    assert set(cli.COMPILATION_CACHED) == {"route", "train", "eval", "run"}


@pytest.mark.slow
def test_compilation_cache_is_written_and_read_across_processes(tmp_path):
    """A second process compiles nothing: it reads the executables the first one stored."""
    code = ("import jax, jax.numpy as jnp\n"
            "from mixllm_jax.text import cache\n"
            "cache.enable_compilation_cache(min_compile_time_s=0)\n"
            "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"
            "print(float(f(jnp.ones((64, 64)))))\n")
    env = {"MIXLLM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    run()
    files = sorted(p.name for p in (tmp_path / "jax").iterdir())
    assert files, "nothing was written to the persistent cache"
    run()
    assert sorted(p.name for p in (tmp_path / "jax").iterdir()) == files  # a hit: no new entry

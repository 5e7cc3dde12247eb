"""Router: the fused text-to-decision path, explanations, save/load."""
import numpy as np
import pytest

from mixllm_jax.core.config import HeadConfig, RouterConfig
from mixllm_jax import data
from mixllm_jax.text import encoder, tags
from mixllm_jax.offline import train
from mixllm_jax.core.policy import Policy
from mixllm_jax.text.tokens import truncate


@pytest.fixture(scope="module")
def enc():
    return encoder.load_encoder()


@pytest.fixture(scope="module")
def small_router(enc):
    ds = data.load_routerbench(split="train")
    idx = np.concatenate([np.flatnonzero([t == (task,) for t in ds.tags])[:40]
                          for task in sorted({t[0] for t in ds.tags})])
    ds = ds.select(idx)
    e = enc.embed(ds.prompts, max_length=64)
    return train.train_router(ds, data.load_models(data.routerbench_dir() / "models.json"), enc,
                              RouterConfig(head=HeadConfig(hidden=64, features=16, epochs=20), max_length=64,
                                           ridges=(10.0, 100.0), folds=2),
                              embeddings=e, progress=False), ds, e


def test_fused_path_equals_step_by_step(small_router, enc):
    router, ds, _ = small_router
    texts = ds.prompts[:5] + ["What is the capital of France?"]
    d, domain, _ = router.decide(texts, Policy(cost_weight=10.0))
    ids, mask, p_tok = router.tokenize(texts)
    x = router.embed_features(enc.embed_ids(ids, mask))
    from mixllm_jax.core import engine
    ref = engine.route(router.state, np.asarray(x)[:6], p_tok[:6], Policy(cost_weight=10.0))
    np.testing.assert_array_equal(np.asarray(d.arm)[:6], np.asarray(ref.arm))
    np.testing.assert_allclose(np.asarray(d.score)[:6][:, :11], np.asarray(ref.score)[:, :11], atol=1e-5)
    assert domain is not None and set(np.asarray(domain)[:6]) <= set(range(len(router.head.tags)))


def test_route_explains_every_llm(small_router):
    router, ds, _ = small_router
    routes = router.route(["Which of these is a mammal? (A) shark (B) whale", "def add(a, b):"])
    assert len(routes) == 2
    for r in routes:
        assert set(r.quality) == set(ds.models) and r.model in ds.models
        assert r.score[r.model] == max(r.score.values())
        assert r.domain in router.head.tags


def test_prompt_tokens_count_the_whole_text(small_router):
    router, _, _ = small_router
    long = "word " * 300
    ids, mask, p_tok = router.tokenize([long, "short"])
    assert mask[0].sum() == router.max_length and p_tok[0] > 300 and p_tok[1] == 3


def test_truncate_keeps_specials():
    ids = [101, 1, 2, 3, 4, 5, 102]
    assert truncate(ids, 4, "left") == [101, 4, 5, 102]
    assert truncate(ids, 4, "right") == [101, 1, 2, 102]
    assert truncate(ids, 10, "left") == ids


def test_route_rejects_bad_texts(small_router):
    router, _, _ = small_router
    for bad in ("a string", [], [1, 2]):
        with pytest.raises(ValueError, match="texts must be"):
            router.route(bad)

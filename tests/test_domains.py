"""Domains that grow: a far query opens a spare domain, later ones join and move it, in-domain
queries keep their trained domains, and the grown head routes with the new domain."""

import numpy as np
import pytest

from mixllm_jax.text import domains, tags
from mixllm_jax.core.config import HeadConfig, RouterConfig
from mixllm_jax.text.router import DOMAIN_SCALE, Router


def _clusters(rng, centers, n):
    e = np.concatenate([c + 0.05 * rng.normal(size=(n, len(c))) for c in centers]).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def grown():
    rng = np.random.default_rng(0)
    H = 16
    centers = np.eye(H)[:3] * 1.0  # three well separated directions; the third is never trained on
    e_tr = _clusters(rng, centers[:2], 100)
    tg = [("a",)] * 100 + [("b",)] * 100
    q = rng.random((200, 2)).astype(np.float32)
    head = tags.train_head(e_tr, tg, q, np.zeros_like(q), HeadConfig(hidden=32, features=8, epochs=40, val_frac=0.0))
    config = RouterConfig(spare_domains=2)
    router = Router(encoder=None, head=domains.with_spare(head, 2), state=None, registry=None, config=config)
    return rng, router, e_tr, centers


def test_spare_domains_are_never_assigned_until_opened(grown):
    rng, router, e_tr, _ = grown
    assert router.head.tags[-2:] == ("new-0", "new-1")
    x = np.asarray(router.embed_features(e_tr))
    assert x.shape[1] == 16 + 4 + 1
    assert x[:, 16 + 2:16 + 4].max() == 0  # no training query sits in a spare slot
    assert (x[:100, 16] == DOMAIN_SCALE).mean() > 0.95 and (x[100:, 17] == DOMAIN_SCALE).mean() > 0.95


def test_far_queries_open_a_domain_that_follows_them(grown):
    rng, router, e_tr, centers = grown
    g = domains.DomainGrowth.from_router(router, e_tr)
    assert g.n_trained == 2 and g.n_open == 0 and g.spare == 2
    e_in = _clusters(rng, centers[:2], 20)
    e_new = _clusters(rng, centers[2:], 30)
    stream = np.concatenate([e_in[:20], e_new, e_in[20:]])
    x = g.stream_features(router, stream)
    assert g.n_open == 1, g.summary()  # one new cluster -> one new domain, not one per query
    assert g.opened_at[0]["at"] == 22  # opened by the third far query (min_members 3)
    dom = np.argmax(x[:, 16:20], 1)
    assert (dom[22:50] == 2).all()  # the far queries share the new domain from then on
    np.testing.assert_array_equal(x[:20], np.asarray(router.embed_features(stream[:20])))  # in-domain: unchanged
    u = e_new / np.linalg.norm(e_new, axis=1, keepdims=True)
    np.testing.assert_allclose(g.centroids[2], u.mean(0), atol=1e-4)  # the mean of its queries (running)
    assert g.counts[2] == 30
    after = g.apply_to(router)  # routing after the stream sees the grown domain
    x_after = np.asarray(after.embed_features(_clusters(rng, centers[2:], 5)))
    assert (x_after[:, 16 + 2] == DOMAIN_SCALE).all()


def test_growth_needs_spare_slots(grown):
    _, router, e_tr, _ = grown
    full = Router(encoder=None, head=router.head._replace(centroids=np.ones_like(router.head.centroids)),
                  state=None, registry=None, config=router.config)
    with pytest.raises(ValueError, match="spare"):
        domains.DomainGrowth.from_router(full, e_tr)
    with pytest.raises(ValueError, match="spare_domains"):
        RouterConfig(spare_domains=2, features="head")

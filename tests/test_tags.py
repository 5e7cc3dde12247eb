import numpy as np
import pytest

from mixllm_jax.text import tags


def synthetic(rng, n_per=60, dim=32, groups=3):
    """Embeddings with weak group structure buried in noise, and group-dependent qualities."""
    centers = rng.normal(size=(groups, dim)) * 0.4
    g = np.repeat(np.arange(groups), n_per)
    e = centers[g] + rng.normal(size=(len(g), dim))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    quality = (rng.random((len(g), 2)) < np.where(g[:, None] == 0, [0.9, 0.2], [0.3, 0.8])).astype(np.float32)
    quality[::7, 1] = np.nan  # unknown scores are masked
    log_tok = np.log(np.where(g[:, None] == 1, 50.0, 5.0) * np.ones((1, 2))).astype(np.float32)
    return e.astype(np.float32), [(f"t{i}",) for i in g], quality, log_tok


def test_head_separates_held_out_domains(rng):
    e, t, q, lt = synthetic(rng, n_per=120)
    tr = np.arange(len(e)) % 4 != 0
    head = tags.train_head(e[tr], [t[i] for i in np.flatnonzero(tr)], q[tr], lt[tr],
                           tags.HeadConfig(hidden=64, features=16, epochs=60, batch_size=64))
    onehot, names = tags.multi_hot([t[i] for i in np.flatnonzero(~tr)], head.tags)
    raw = tags.separation_ratio(e[~tr], onehot)
    with_head = tags.separation_ratio(tags.apply_head(head, e[~tr]), onehot)
    assert with_head < raw
    # nearest domain (embedding-space centroids) of held-out queries is mostly their own
    assert head.centroids.shape == (len(names), e.shape[1])
    assert (tags.nearest_domain(head, e[~tr]) == onehot.argmax(1)).mean() > 0.8


def test_tag_losses_by_hand():
    z = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    onehot = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    intra, inter = tags.tag_losses(z, onehot, margin=2.0)
    assert float(intra) == pytest.approx(0.0, abs=1e-6)  # everyone sits on its centroid
    # centroids (1,0) and (0,1) are sqrt(2) apart: hinge (2 - sqrt 2)^2
    assert float(inter) == pytest.approx((2 - np.sqrt(2)) ** 2, rel=1e-4)


def test_multi_hot_handles_several_tags():
    m, names = tags.multi_hot([("a",), ("a", "b"), ()])
    assert names == ("a", "b")
    np.testing.assert_array_equal(m, [[1, 0], [1, 1], [0, 0]])


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.eye(8)[:4] * 5
    labels = rng.integers(0, 4, 400)
    e = centers[labels] + 0.3 * rng.normal(size=(400, 8))
    got = tags.kmeans_domains(e, 4)
    names = sorted({t for (t,) in got})
    assert len(names) == 4 and all(n.startswith("domain-") for n in names)
    for k in range(4):  # each true cluster maps to one derived domain
        assert len({got[i] for i in np.flatnonzero(labels == k)}) == 1

"""Checks of mixllm_jax.offline.mesh / distributed run in a child process with forced host devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python tests/mesh_child.py CHECK [ARGS] ...

CHECKs, run in order in one process (one jax start, one compilation cache): route | update | text |
cli OUT_DIR | bench OUT_DIR | dist PROCESS_ID NUM_PROCESSES PORT OUT_DIR |
cli-procs PROCESS_ID NUM_PROCESSES PORT OUT_DIR.
Prints "ok CHECK" after each check whose assertions hold. Sizes are tiny (d, K < 10): these are
correctness checks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest helpers

LAYOUTS = ((4, 1), (1, 4), (2, 2))  # (batch, arms) shards of the 4 devices


def _close(a, b, rtol=1e-5, atol=1e-5, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    inf = np.isinf(b)
    np.testing.assert_array_equal(a[inf], b[inf], err_msg=what)  # -inf on inactive arms, +inf slots
    np.testing.assert_allclose(a[~inf], b[~inf], rtol=rtol, atol=atol, err_msg=what)


def fitted_state(K=8, d=6, active=6, n=300, seed=0):
    import jax.numpy as jnp
    from conftest import make_state, random_obs
    from mixllm_jax.core import bandit

    rng = np.random.default_rng(seed)
    st = make_state(capacity=K, dim=d, n_active=active)
    x, a, y = random_obs(rng, n, d, active)
    return bandit.update_batch(st, jnp.asarray(x), jnp.asarray(a), jnp.asarray(y)), rng


def check_route():
    import jax
    import jax.numpy as jnp
    from conftest import random_obs
    from mixllm_jax.core import engine
    from mixllm_jax.offline import mesh as M
    from mixllm_jax.core.policy import Policy, advance_clock, commit_load, route_batch

    assert len(jax.devices()) == 4, jax.devices()
    st, rng = fitted_state()
    K, d = st.capacity, st.dim
    # some load already booked, so the latency penalty matters
    warm, _, _ = random_obs(rng, 40, d, 6)
    st = commit_load(st, route_batch(st, jnp.asarray(warm), jnp.full(40, 300.0), Policy(tau=0.5)))
    B = 64
    x, _, _ = random_obs(rng, B, d, 6)
    pt = rng.uniform(10, 2000, B).astype(np.float32)
    bonus = rng.normal(size=(B, K)).astype(np.float32) * 0.1
    valid = np.arange(B) < 60
    n_checked = 0
    # every layout, each load path and the bonus, each compile once: (in-batch load, bonus, layouts)
    # (the stochastic cases below add 2x2 with the load, 4x1 and 1x4 without)
    for ibl, bon, layouts in ((False, None, LAYOUTS[:2]), (True, None, LAYOUTS[:2]), (True, bonus, LAYOUTS[2:])):
        pol = Policy(cost_weight=30.0, alpha=0.5, beta=0.2, tau=2.0, in_batch_load=ibl)
        ref = route_batch(st, jnp.asarray(x), jnp.asarray(pt), pol, jnp.asarray(valid),
                          None if bon is None else jnp.asarray(bon))
        assert len(np.unique(np.asarray(ref.arm))) > 2  # not trivially one arm
        for nb, na in layouts:
            mesh = M.make_mesh(4, arms=na)
            sst = M.shard_state(st, mesh)
            got = M.route_batch(sst, x, pt, pol, valid, bon, mesh=mesh)
            what = f"in_batch_load={ibl} bonus={bon is not None} mesh={nb}x{na}"
            np.testing.assert_array_equal(np.asarray(got.arm), np.asarray(ref.arm), err_msg=what)
            for f in ("quality", "tokens", "cost", "uncertainty", "wait", "penalty", "score", "free_at",
                      "propensity"):
                _close(getattr(got, f), getattr(ref, f), rtol=1e-5, atol=2e-5, what=f"{what} {f}")
            n_checked += 1
    # stochastic policies: the same key and batch shape give the same draws, so the same decisions
    key = jax.random.PRNGKey(7)
    for pol, (nb, na) in ((Policy(cost_weight=30.0, alpha=1.0, beta=0.2, tau=2.0, explore="thompson"), (2, 2)),
                          (Policy(cost_weight=30.0, alpha=1.0, explore="thompson", in_batch_load=False), (4, 1)),
                          (Policy(cost_weight=30.0, alpha=0.5, temperature=0.05, epsilon=0.2, in_batch_load=False),
                           (1, 4))):
        ref = route_batch(st, jnp.asarray(x), jnp.asarray(pt), pol, jnp.asarray(valid), None, key)
        plain = route_batch(st, jnp.asarray(x), jnp.asarray(pt), pol.replace(temperature=0.0, epsilon=0.0,
                                                                                 explore="ucb"), jnp.asarray(valid))
        assert np.mean(np.asarray(ref.arm) != np.asarray(plain.arm)) > 0.05  # the draws matter
        mesh = M.make_mesh(4, arms=na)
        got = M.route_batch(M.shard_state(st, mesh), x, pt, pol, valid, None, key, mesh=mesh)
        what = f"{pol.explore} T={pol.temperature} eps={pol.epsilon} {nb}x{na}"
        np.testing.assert_array_equal(np.asarray(got.arm), np.asarray(ref.arm), err_msg=what)
        for f in ("score", "free_at", "propensity"):
            _close(getattr(got, f), getattr(ref, f), rtol=1e-5, atol=2e-5, what=f"{what} {f}")
        n_checked += 1
    # each device holds its K / 4 arms in the arm-parallel layout
    mesh = M.make_mesh(4, arms=4)
    sst = M.shard_state(st, mesh)
    assert {s.data.shape for s in sst.A_inv.addressable_shards} == {(K // 4, d, d)}
    # no recompilation for new numbers of the same shapes (policy numbers, queries, state values)
    pol = Policy(cost_weight=30.0, alpha=0.5, beta=0.2, tau=2.0, in_batch_load=False)
    M.route_batch(sst, x, pt, pol, mesh=mesh)
    before = M.TRACES["route_batch"]
    for cw in (0.0, 10.0, 1e4):
        x2, _, _ = random_obs(rng, B, d, 6)
        M.route_batch(sst, x2, pt, pol.replace(cost_weight=cw, alpha=0.1), mesh=mesh)
    M.route_batch(M.shard_state(advance_clock(st, 3.0), mesh), x, pt, pol, mesh=mesh)
    assert M.TRACES["route_batch"] == before, M.TRACES
    # the checked entry pads to a bucket that the mesh divides, and slices back
    for n, (nb, na) in zip((1, 5, 33), LAYOUTS):
        mesh = M.make_mesh(4, arms=na)
        got = M.route(st, x[:n], pt[:n], pol, mesh=mesh)
        ref = engine.route(st, x[:n], pt[:n], pol)
        np.testing.assert_array_equal(np.asarray(got.arm), np.asarray(ref.arm))
        _close(got.score, ref.score, what=f"route n={n}")
        assert got.propensity.shape == (n,)
    # the checked entry checks as engine.route does
    for bad, msg in (({"policy": pol.replace(explore="thompson")}, "needs a PRNG key"),
                     ({"x": x[:3] * np.nan}, "x must be finite")):
        kw = dict(state=st, x=x[:3], prompt_tokens=pt[:3], policy=pol) | bad
        try:
            M.route(**kw, mesh=M.make_mesh(4))
            raise AssertionError(f"{msg} must be refused")
        except ValueError as e:
            assert msg in str(e), e
    try:
        M.route_batch(st, x[:6], pt[:6], pol, mesh=M.make_mesh(4))
        raise AssertionError("a batch the mesh does not divide must be refused")
    except ValueError as e:
        assert "multiple of the mesh's 4 batch shards" in str(e)
    try:
        M.shard_state(fitted_state(K=6, active=4)[0], M.make_mesh(4, arms=4))
        raise AssertionError("K = 6 over 4 arm shards must be refused")
    except ValueError as e:
        assert "multiple of the mesh's 4 arm shards" in str(e)
    return {"layouts_checked": n_checked, "traces": dict(M.TRACES)}


def _numpy_ridge_all(x, arm, y, K, d, ridge=1.0, w=None, prior=None):
    from conftest import numpy_ridge

    return [numpy_ridge(x, arm, y, k, d, ridge, w) for k in range(K)]


def check_update():
    import jax.numpy as jnp
    from conftest import make_state, random_obs
    from mixllm_jax.core import bandit, engine
    from mixllm_jax.offline import mesh as M, train
    from mixllm_jax.data import Dataset, ModelSpec

    rng = np.random.default_rng(1)
    K, d, active = 8, 6, 6
    st0 = make_state(capacity=K, dim=d, n_active=active)
    xs, arms, ys, ws = [], [], [], []
    states = {(lay, meth): st0 for lay in LAYOUTS for meth in M.UPDATE_METHODS}
    ref = st0
    for n in (1, 37, 300, 1500):  # 1838 rows: more than one statistics block per device
        x, a, y = random_obs(rng, n, d, active)
        x[:, :-1] *= 0.5
        w = rng.integers(0, 3, n).astype(np.float32)  # 0: skipped, 2: counted twice
        a[: n // 3] = 2  # a hot arm
        for (lay, meth), st in states.items():
            states[(lay, meth)] = M.update(st, x, a, y, w, mesh=M.make_mesh(4, arms=lay[1]), method=meth)
        _, y_arms = bandit.split(ref, jnp.asarray(x), jnp.asarray(a), jnp.asarray(y), jnp.asarray(w))  # the arms' targets
        ref = engine.update(ref, x, a, y, w)
        xs.append(x), arms.append(a), ys.append(np.asarray(y_arms)), ws.append(w)
    x, a, y, w = map(np.concatenate, (xs, arms, ys, ws))
    expect = _numpy_ridge_all(x, a, y, active, d, w=w)  # the closed form of the arms' targets
    for lay, st in states.items():
        th = np.asarray(bandit.theta(st))
        for k in range(active):
            np.testing.assert_allclose(th[k], expect[k][0], atol=2e-4, rtol=1e-3, err_msg=f"theta {lay} {k}")
            np.testing.assert_allclose(np.asarray(st.A_inv[k]), expect[k][1], atol=1e-6, rtol=1e-3)
        np.testing.assert_array_equal(np.asarray(st.count)[:active], [((a == k) & (w > 0)).sum() for k in range(active)])
        for f in ("A", "A_inv", "count", "shared_A"):  # the unsharded updates
            np.testing.assert_allclose(np.asarray(getattr(st, f)), np.asarray(getattr(ref, f)), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{lay} {f}")
        for f in ("B", "shared_B"):  # sums of the split's targets, float32 predictions of other reduction orders
            np.testing.assert_allclose(np.asarray(getattr(st, f)), np.asarray(getattr(ref, f)), rtol=1e-3, atol=5e-3,
                                       err_msg=f"{lay} {f}")
        A_inv = np.asarray(st.A_inv)
        np.testing.assert_array_equal(A_inv, np.swapaxes(A_inv, 1, 2))
        assert float(bandit.drift(st)[:active].max()) < 1e-4
        np.testing.assert_array_equal(np.asarray(st.A_inv)[active:], np.asarray(st0.A_inv)[active:])  # untouched

    # the same bucketed shapes compile once per mesh
    mesh = M.make_mesh(4, arms=2)
    M.update(st0, x[:30], a[:30], y[:30], mesh=mesh, method="stats")
    before = M.TRACES["update_batch"]
    M.update(st0, x[30:55], a[30:55], y[30:55], mesh=mesh, method="stats")
    M.update(states[((2, 2), "stats")], x[:32], a[:32], y[:32], w[:32], mesh=mesh, method="stats")
    assert M.TRACES["update_batch"] == before, M.TRACES
    M.update(st0, x[:30], a[:30], y[:30], mesh=mesh, method="woodbury")
    before = M.TRACES["update_batch_woodbury"]
    M.update(states[((2, 2), "woodbury")], x[:32], a[:32], y[:32], w[:32], mesh=mesh)
    assert M.TRACES["update_batch_woodbury"] == before, M.TRACES

    # the offline statistics of a logged dataset, sharded, against fit.arm_stats; training from them
    from functools import partial

    from mixllm_jax.core import fit, observation
    from mixllm_jax.core.config import Budget, RouterConfig

    N, models = 700, ["m0", "m1", "m2"]
    specs = [ModelSpec(mm, 1.0 + i, 2.0 + i) for i, mm in enumerate(models)]
    q = rng.uniform(0, 1, (N, 3)).astype(np.float32)
    q[rng.uniform(size=q.shape) < 0.2] = np.nan  # unobserved outcomes
    ct = rng.integers(1, 500, (N, 3)).astype(np.float32)
    ds = Dataset([f"q{i}" for i in range(N)], [f"p{i}" for i in range(N)], [("t",)] * N, models, q,
                 200 * np.arange(1, 4) + ct * np.arange(2, 5), np.full(N, 200.0), ct, ["train"] * N, specs=specs)
    e = rng.normal(size=(N, d - 1)).astype(np.float32)
    x = np.concatenate([e, np.ones((N, 1), np.float32)], 1)
    lt = observation.log_tokens(ct)
    single = fit.arm_stats(x, q, lt)
    for nb, na in LAYOUTS:
        got = M.arm_stats(x, q, lt, mesh=M.make_mesh(4, arms=na))  # M = 3 LLMs padded to the arm shards
        for a, b, name in zip(got, single, ("S", "b", "yy", "n")):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-3, err_msg=f"{nb}x{na} {name}")
    cfg = RouterConfig(head=None, features="raw", ridges=(1.0, 30.0), budget=Budget("share", 0.4), folds=2)
    ref = train.train_router(ds, specs, None, cfg, embeddings=e, progress=False)
    sharded = train.train_router(ds, specs, None, cfg, embeddings=e, progress=False,
                                 arm_stats=partial(M.arm_stats, mesh=M.make_mesh(4, arms=2)))
    for f in ("A", "A_inv", "B", "count", "noise", "ridge"):
        np.testing.assert_allclose(np.asarray(getattr(sharded.state, f)), np.asarray(getattr(ref.state, f)),
                                   rtol=1e-4, atol=1e-5, err_msg=f"train_router {f}")
    assert sharded.policy == ref.policy
    return {"traces": dict(M.TRACES)}


def tiny_encoder_params(seed=0):
    import jax
    import jax.numpy as jnp
    from mixllm_jax.text.bert import BertConfig, BertEncoder

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32)
    dummy = jnp.zeros((1, 4), jnp.int32)
    return cfg, BertEncoder(cfg).init(jax.random.PRNGKey(seed), dummy, dummy)["params"]


def check_text():
    import jax
    import jax.numpy as jnp
    from mixllm_jax.offline import mesh as M
    from mixllm_jax.core import state as S
    from mixllm_jax.text import tags
    from mixllm_jax.text.encoder import Encoder
    from mixllm_jax.core.policy import Policy
    from mixllm_jax.text.router import route_text_batch

    cfg, params = tiny_encoder_params()
    rng = np.random.default_rng(2)
    B, L, H, G = 16, 12, cfg.hidden_size, 3
    ids = rng.integers(1, cfg.vocab_size, (B, L)).astype(np.int32)
    lengths = rng.integers(2, L + 1, B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    mask[-2:] = 0  # padding rows
    pt = lengths.astype(np.float32) * 7
    valid = mask.any(1)
    head = tags.TagHead(6, 5)
    head_params = head.init(jax.random.PRNGKey(1), jnp.zeros((1, H)))["params"]
    centroids = jnp.asarray(rng.normal(size=(G, H)), jnp.float32)  # domains in the embedding space
    heads = {"raw+domain": (head_params, centroids, (6, 5), H + G + 1),
             "head": (head_params, centroids, (6, 5), 5 + 1), "raw": (None, None, None, H + 1)}
    # (feature mode, in-batch load, layout): every layout, mode and load path once (each compiles
    # the encoder: a few seconds)
    cases = [("raw+domain", False, (4, 1)), ("raw+domain", False, (1, 4)), ("raw+domain", True, (2, 2)),
             ("head", False, (2, 2)), ("raw", True, (4, 1))]
    states = {}
    for mode, ibl, (nb, na) in cases:
        hp, cen, shape, dim = heads[mode]
        if mode not in states:
            st = S.init_state(8, dim)
            for k in range(6):
                st = S.add_arm(st, k, price_in=1e-6 * (k + 1), price_out=2e-6 * (k + 1), max_concurrency=2,
                               prior=float(rng.uniform()))
            states[mode] = st.replace(B=st.B + jnp.asarray(rng.normal(size=st.B.shape), jnp.float32) * 0.3)
        st = states[mode]
        pol = Policy(cost_weight=50.0, alpha=0.3, beta=0.1, tau=0.2, in_batch_load=ibl)
        ref, ref_dom, _ = route_text_batch(params, hp, cen, st, ids, mask, pt, pol, valid,
                                        enc_config=cfg, head_shape=shape, mode=mode)
        assert len(np.unique(np.asarray(ref.arm))) > 1
        mesh = M.make_mesh(4, arms=na)
        got, dom = M.route_text_batch(params, hp, cen, M.shard_state(st, mesh), ids, mask, pt, pol, valid,
                                      enc_config=cfg, head_shape=shape, mode=mode, mesh=mesh)
        what = f"{mode} in_batch_load={ibl} {nb}x{na}"
        np.testing.assert_array_equal(np.asarray(got.arm), np.asarray(ref.arm), err_msg=what)
        for f in ("quality", "uncertainty", "cost", "score", "free_at"):
            _close(getattr(got, f), getattr(ref, f), rtol=1e-5, atol=2e-5, what=f"{what} {f}")
        assert (dom is None) == (ref_dom is None)
        if dom is not None:
            np.testing.assert_array_equal(np.asarray(dom), np.asarray(ref_dom))
    # new token ids of the same shapes: no recompile
    before = M.TRACES["route_text_batch"]
    M.route_text_batch(params, None, None, st, ids[::-1].copy(), mask, pt, pol, valid,
                       enc_config=cfg, head_shape=None, mode="raw", mesh=mesh)
    assert M.TRACES["route_text_batch"] == before
    # Router.decide on the mesh: texts -> tokens -> the sharded fused path (padded to the mesh)
    from mixllm_jax.core.config import RouterConfig
    from mixllm_jax.text.router import Router
    from mixllm_jax.core.state import ArmRegistry

    enc = Encoder(params, cfg, tiny_tokenizer(cfg.vocab_size), {"name": "tiny", "hidden_size": H}, max_length=32)
    trained = tags.TrainedHead(head_params, 6, 5, ("a", "b", "c"), np.asarray(centroids))
    router = Router(encoder=enc, head=trained, state=states["raw+domain"], registry=ArmRegistry(8),
                    policy=Policy(cost_weight=50.0, alpha=0.3, beta=0.1, tau=0.2),
                    config=RouterConfig(max_length=16))
    texts = [" ".join(f"w{j}" for j in rng.integers(0, 40, n)) for n in (3, 9, 1, 30, 5)]
    ref, ref_dom, _ = router.decide(texts)
    got, dom = M.decide(router, texts, mesh=M.make_mesh(4, arms=2))
    np.testing.assert_array_equal(np.asarray(got.arm)[:5], np.asarray(ref.arm)[:5])
    np.testing.assert_array_equal(np.asarray(dom)[:5], np.asarray(ref_dom)[:5])
    _close(np.asarray(got.score)[:5], np.asarray(ref.score)[:5], what="decide")
    _close(got.free_at, ref.free_at, what="decide free_at")  # padding rows book nothing

    # the encoder's batches split over the devices: same embeddings; a batch of 5 runs unsplit
    sharded = M.shard_encoder(enc, M.make_mesh(4, arms=2))
    for n in (16, 8, 5):
        out = sharded._embed(sharded.params, ids[:n], mask[:n])
        np.testing.assert_allclose(np.asarray(out), np.asarray(enc.embed_ids(ids[:n], mask[:n])), atol=1e-6)
        assert len(out.sharding.device_set) == (4 if n % 4 == 0 else 1), (n, out.sharding)
    return {"traces": dict(M.TRACES)}


def tiny_tokenizer(vocab_size: int):
    """A transformers fast tokenizer over the words w0, w1, ... ([CLS] text [SEP], BERT's layout)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


class FakeEncoder:
    """A deterministic stand-in for encoder.Encoder: embeds a text from its hash; records calls."""

    identity = {"name": "fake-encoder", "hidden_size": 5}
    max_length = 32

    def __init__(self):
        self.seen: list[str] = []

    def embed(self, texts, batch_size=64, max_length=None, truncation_side="left", progress=False):
        self.seen += list(texts)
        return np.stack([np.random.default_rng(int(t[1:])).normal(size=5) for t in texts]).astype(np.float32)


def check_dist(process_id: int, num_processes: int, port: int, out_dir: str):
    """One process of a jax.distributed run (num_processes 1: no coordinator, the reference)."""
    import jax

    from mixllm_jax.offline import distributed as D

    if num_processes > 1:
        D.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    from mixllm_jax.core import bandit, observation
    from mixllm_jax.store import checkpoint
    from mixllm_jax.offline import mesh as M, train
    from mixllm_jax.data import Dataset, ModelSpec

    rng = np.random.default_rng(3)
    N, models, d = 333, ["a", "b", "c"], 6
    specs = [ModelSpec(mm, 1.0 + i, 2.0 + i) for i, mm in enumerate(models)]
    q = rng.uniform(0, 1, (N, 3)).astype(np.float32)
    q[rng.uniform(size=q.shape) < 0.25] = np.nan
    ct = rng.integers(1, 500, (N, 3)).astype(np.float32)
    ds = Dataset([f"q{i}" for i in range(N)], [f"p{i}" for i in range(N)], [("t",)] * N, models, q,
                 100 * np.arange(1, 4) + ct * np.arange(2, 5), np.full(N, 100.0), ct, ["train"] * N, specs=specs)

    # each process embeds its own share; every process gets the whole log's embeddings in order
    enc = FakeEncoder()
    e = D.embed(enc, ds, cache_dir=Path(out_dir) / f"cache-{num_processes}-{process_id}", progress=False)
    assert sorted(enc.seen) == sorted(ds.prompts[i] for i in range(process_id, N, num_processes))
    np.testing.assert_array_equal(e, FakeEncoder().embed(ds.prompts))

    # train_router with the arms' statistics summed over the processes (2 local devices each,
    # arm-parallel), against the closed form of the whole log
    from functools import partial

    from mixllm_jax.core.config import Budget, RouterConfig

    mesh = M.make_mesh(jax.local_devices()[:2], arms=2)
    cfg = RouterConfig(head=None, features="raw", ridges=(3.0,), budget=Budget("share", 0.4), folds=2)
    router = train.train_router(ds, specs, None, cfg, embeddings=e, progress=False,
                                arm_stats=partial(D.arm_stats, mesh=mesh))
    filled, reg = router.state, router.registry
    host = {f: np.asarray(getattr(filled, f)) for f in ("A", "A_inv", "B", "count", "noise")}
    np.savez(Path(out_dir) / f"state-{num_processes}-{process_id}.npz", cost_weight=router.policy.cost_weight,
             mix=router.policy.mix, **host)
    x = np.concatenate([e, np.ones((N, 1), np.float32)], 1)
    for j, mm in enumerate(models):
        k = reg.slot(mm)
        seen = np.isfinite(q[:, j])
        X = x[seen].astype(np.float64)
        Y = np.stack([q[seen, j], observation.log_tokens(ct[seen, j])], 1).astype(np.float64)
        A = np.diag(np.r_[np.full(d - 1, 3.0), 0.1]) + X.T @ X  # the bias is an unshrunk intercept
        np.testing.assert_allclose(np.asarray(bandit.theta(filled))[k], np.linalg.solve(A, X.T @ Y),
                                   atol=2e-4, rtol=1e-3)
        assert float(filled.count[k]) == seen.sum()
    # the same router as one process's (the plain statistics of the whole log)
    one = train.train_router(ds, specs, None, cfg, embeddings=e, progress=False)
    for f in ("A", "A_inv", "B", "count", "noise"):
        ref = np.asarray(getattr(one.state, f))
        np.testing.assert_allclose(host[f], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f)
    np.testing.assert_allclose([router.policy.cost_weight, router.policy.mix],
                               [one.policy.cost_weight, one.policy.mix], rtol=1e-5)
    # every process saves, collectively (Orbax); the checkpoint restores to the merged state
    step = checkpoint.save_router(router, Path(out_dir) / f"ckpt-{num_processes}")
    if num_processes > 1:
        D.broadcast(np.zeros(1))  # a barrier: process 0 may have been the one that committed
    restored = checkpoint.restore_router(Path(out_dir) / f"ckpt-{num_processes}", step=step, encoder=None)[0]
    np.testing.assert_array_equal(np.asarray(restored.state.A_inv), host["A_inv"])
    assert restored.policy == router.policy
    return {"step": step}


def _cli_commands(out: Path):
    """(train argv, eval argv) of the CLI checks: the logs and the tiny random BERT (hidden 32, MiniLM's
    tokenizer) written by tests/test_mesh.py in `out`."""
    from mixllm_jax import data

    models = str(data.routerbench_dir() / "models.json")
    train = ["train", "--data", str(out / "train.jsonl"), "--models", models, "--max-length", "32", "--no-head",
             "--encoder", str(out / "tiny-bert")]
    ev = ["eval", "--data", str(out / "test.jsonl"), "--train-data", str(out / "train.jsonl"), "--models", models,
          "--no-baselines"]
    return train, ev


def _cli(argv):
    from mixllm_jax import cli

    cli.main([str(a) for a in argv])


def check_cli(out_dir: str):
    """mixllm-jax train/eval plainly and with --devices 2 --arm-shards 2 (tests/test_mesh.py compares)."""
    out = Path(out_dir)
    train, ev = _cli_commands(out)
    _cli(train + ["--out", out / "one"])
    _cli(train + ["--out", out / "dev", "--devices", 2, "--arm-shards", 2])
    _cli(ev + ["--router", out / "one", "--out", out / "eval-one"])
    _cli(ev + ["--router", out / "dev", "--out", out / "eval-dev", "--devices", 2])
    return {}


def check_cli_procs(process_id: int, num_processes: int, port: int, out_dir: str):
    """One process of `mixllm-jax train` and `eval` over processes (--coordinator ...)."""
    out = Path(out_dir)
    train, ev = _cli_commands(out)
    run = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", num_processes, "--process-id", process_id]
    t0 = time.perf_counter()
    _cli(train + ["--out", out / "procs"] + run)
    t1 = time.perf_counter()
    _cli(ev + ["--router", out / "procs", "--out", out / "eval-procs"] + run)
    return {"train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1)}


def check_bench(out_dir: str):
    """python -m benchmarks.mesh --quick, in this process (tests/test_mesh.py reads its results)."""
    from benchmarks import mesh as bench

    assert bench.main(["--quick", "--out", str(Path(out_dir) / "bench")]) == 0
    return {}


CHECKS = {"route": (check_route, 0), "update": (check_update, 0), "text": (check_text, 0), "cli": (check_cli, 1),
          "bench": (check_bench, 1), "dist": (check_dist, 4), "cli-procs": (check_cli_procs, 4)}

if __name__ == "__main__":
    import conftest  # noqa: F401  (the tests' persistent compilation cache)

    argv = sys.argv[1:]
    while argv:
        name, argv = argv[0], argv[1:]
        fn, arity = CHECKS[name]
        args, argv = [int(a) if a.isdigit() else a for a in argv[:arity]], argv[arity:]
        t0 = time.perf_counter()
        info = fn(*args)
        print(f"ok {name} {json.dumps(info)} {time.perf_counter() - t0:.1f} s", flush=True)

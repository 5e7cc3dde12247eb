"""Orbax checkpoints: round trip with bit-identical decisions, keep-last-N, kill mid-save, errors."""
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixllm_jax.core.config import HeadConfig, RouterConfig
from mixllm_jax.store import checkpoint as ckpt, steps
from mixllm_jax.core import engine
from mixllm_jax.text import tags
from mixllm_jax.core import state as S
from mixllm_jax.store.checkpoint import CheckpointError, list_steps, restore_router, save_router
from mixllm_jax.core.policy import Policy, route_batch
from mixllm_jax.text.router import Router

H, F, N, M = 12, 8, 64, 3  # embedding dim, head features, queries, LLMs
CHILD = Path(__file__).with_name("checkpoint_kill_child.py")


def head_config(head):
    return None if head is None else HeadConfig(hidden=head.hidden, features=head.features)


def build_router(head: tags.TrainedHead | None, seed=0) -> tuple[Router, np.ndarray, np.ndarray]:
    """A small trained router; returns (router, x [N, d], prompt_tokens [N])."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(N, H)).astype(np.float32)
    dim = Router(None, head, S.init_state(1, 2), S.ArmRegistry(1)).embed_features(e[:1]).shape[1]
    st, reg = S.init_state(4, dim), S.ArmRegistry(4)
    for k, name in enumerate(["cheap", "mid", "pricey"]):
        st, reg = S.add_llm(st, reg, name, price_in=1e-6 * (k + 1), price_out=3e-6 * (k + 1),
                            ttft=0.2 * (k + 1), tokens_per_s=40.0 + 10 * k, max_concurrency=2 + k)
    router = Router(encoder=None, head=head, state=st, registry=reg,
                    policy=Policy(cost_weight=2e3, alpha=0.05, beta=0.3, tau=5.0, in_batch_load=False),
                    config=RouterConfig(max_length=64, truncation_side="right", head=head_config(head),
                                        features="raw+domain" if head is not None else "raw"))
    x = np.asarray(router.embed_features(e))
    y = np.stack([rng.random(N), rng.normal(size=N) + 5.0], 1).astype(np.float32)
    router.state = engine.update(st, x, rng.integers(0, M, N).astype(np.int32), y)
    return router, x, rng.integers(10, 500, N).astype(np.float32)


@pytest.fixture(scope="module")
def head():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(32, H)).astype(np.float32)
    return tags.train_head(e, [("math",) if i % 2 else ("code",) for i in range(32)],
                           rng.random((32, M)), rng.normal(size=(32, M)) + 5.0,
                           tags.HeadConfig(hidden=16, features=F, epochs=0, batch_size=32))


@pytest.fixture(scope="module")
def built(head):
    return build_router(head)


def make_extras():
    """A stand-in for the feedback network: flax-style params and an optax optimizer state."""
    params = {"Dense_0": {"kernel": jnp.arange(12.0).reshape(3, 4) / 7, "bias": jnp.full((4,), 0.5)}}
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial mu, nu, count
    return {"feedback": {"params": params, "opt_state": opt_state}, "kappa": np.float32(0.25)}


def assert_same_leaves(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [steps.leaf_path(p) for p, _ in la] == [steps.leaf_path(p) for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, steps.leaf_path(p)
        np.testing.assert_array_equal(x, y, err_msg=steps.leaf_path(p))


def assert_same_decisions(r1: Router, r2: Router, x, p_tok, slots=None):
    """engine.route and route_batch (with in-batch load) give bit-identical outputs."""
    a = engine.route(r1.state, x, p_tok, r1.policy)
    b = engine.route(r2.state, x, p_tok, r2.policy)
    pol = r1.policy.replace(in_batch_load=True)
    c = route_batch(r1.state, jnp.asarray(x), jnp.asarray(p_tok), pol)
    d = route_batch(r2.state, jnp.asarray(x), jnp.asarray(p_tok), r2.policy.replace(in_batch_load=True))
    for u, v in ((a, b), (c, d)):
        np.testing.assert_array_equal(np.asarray(u.arm), np.asarray(v.arm))
        for k in ("quality", "tokens", "cost", "uncertainty", "wait", "penalty", "score"):
            uu, vv = np.asarray(getattr(u, k)), np.asarray(getattr(v, k))
            if slots is not None:
                uu, vv = uu[:, slots], vv[:, slots]
            np.testing.assert_array_equal(uu, vv, err_msg=k)


# ---- round trip ---------------------------------------------------------------------------


def test_round_trip_is_bit_identical(built, tmp_path):
    router, x, p_tok = built
    extras = make_extras()
    assert save_router(router, tmp_path, extras=extras) == 1
    back, got = restore_router(tmp_path, extras_like=extras)

    assert_same_decisions(router, back, x, p_tok)
    for f in ("A", "A_inv", "B", "count", "active", "price_in", "price_out", "ttft", "tokens_per_s",
              "max_concurrency", "free_at", "clock", "ridge"):
        a, b = getattr(router.state, f), getattr(back.state, f)
        assert isinstance(b, jax.Array) and a.dtype == b.dtype and a.shape == b.shape, f
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f)
    assert back.registry.to_dict() == router.registry.to_dict()
    assert back.policy == router.policy and back.policy.in_batch_load is False
    assert (back.max_length, back.truncation_side, back.encoder) == (64, "right", None)
    assert back.config == router.config and back.curve == router.curve
    h0, h1 = router.head, back.head
    assert (h1.hidden, h1.features, h1.tags) == (h0.hidden, h0.features, h0.tags)
    assert_same_leaves(h0.params, h1.params)
    np.testing.assert_array_equal(h0.centroids, h1.centroids)
    np.testing.assert_array_equal(np.asarray(back.embed_features(np.ones((2, H), np.float32))),
                                  np.asarray(router.embed_features(np.ones((2, H), np.float32))))
    # extras come back in the structure of extras_like (optax NamedTuples included), jax arrays as jax
    assert jax.tree.structure(got) == jax.tree.structure(extras)
    assert_same_leaves(extras, got)
    assert isinstance(got["feedback"]["params"]["Dense_0"]["kernel"], jax.Array)
    # without extras_like: plain nested containers of numpy arrays, same values
    _, raw = restore_router(tmp_path)
    np.testing.assert_array_equal(raw["feedback"]["params"]["Dense_0"]["kernel"],
                                  np.asarray(extras["feedback"]["params"]["Dense_0"]["kernel"]))
    assert float(raw["kappa"]) == 0.25
    meta = ckpt.read_metadata(tmp_path)
    assert meta["step"] == 1 and meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["state"] == {"capacity": 4, "dim": x.shape[1], "n_targets": 2, "load_slots": 32}
    assert meta["head"]["tags"] == ["code", "math"] and meta["embedding_dim"] == H


def test_feedback_state_round_trip(built, tmp_path):
    """The binary-feedback network's state (a NamedTuple of flax params, optax state, scalars)."""
    from mixllm_jax.core import feedback_net

    router, x, p_tok = built
    K = router.state.capacity
    fs = feedback_net.init_feedback(x.shape[1], K, hidden=8)
    rng = np.random.default_rng(5)
    fs = feedback_net.update(fs, jnp.asarray(x), jnp.asarray(rng.integers(0, 3, N), jnp.int32),
                         jnp.asarray(rng.integers(0, 2, N), jnp.float32), router.state.active)
    save_router(router, tmp_path, extras={"feedback": fs})
    back, got = restore_router(tmp_path, extras_like={"feedback": feedback_net.init_feedback(x.shape[1], K, hidden=8)})
    assert isinstance(got["feedback"], feedback_net.FeedbackState)
    assert_same_leaves(fs, got["feedback"])
    bonus = feedback_net.bonus(fs, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(bonus), np.asarray(feedback_net.bonus(got["feedback"], jnp.asarray(x))))
    a = engine.route(router.state, x, p_tok, router.policy, bonus=bonus)
    b = engine.route(back.state, x, p_tok, back.policy, bonus=feedback_net.bonus(got["feedback"], jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(a.score), np.asarray(b.score))


def test_round_trip_without_head_or_extras(tmp_path):
    router, x, p_tok = build_router(None, seed=3)
    save_router(router, tmp_path)
    back, extras = restore_router(tmp_path, encoder=None, expected_dim=H + 1)
    assert extras is None and back.head is None
    assert_same_decisions(router, back, x, p_tok)


def test_orbax_layout_and_atomic_rename(built, tmp_path):
    """A step is written into <step>.orbax-checkpoint-tmp and renamed when complete."""
    router, _, _ = built
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import atomicity

    seen = []
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def spy(self):
        if Path(self.get_final()).parent == tmp_path.absolute():
            seen.append((self.get().name, self.get().exists(), self.get_final().exists(),
                         sorted(p.name for p in self.get().iterdir())))
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = spy
    try:
        save_router(router, tmp_path, extras=make_extras())
    finally:
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    assert seen == [("1" + steps.TMP_MARK, True, False, ["_CHECKPOINT_METADATA", "extras", "head", "meta", "state"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert ocp.__version__  # recorded in the report


def test_encoder_identity_and_auto_loading(built, tmp_path, monkeypatch):
    """encoder="auto" loads the encoder named in the checkpoint (stubbed here: no weights needed)."""
    from mixllm_jax.text import encoder as enc_mod

    router, x, p_tok = built
    identity = {"name": "org/tiny-encoder", "path": "/nowhere", "hidden_size": H, "model_bytes": 123}
    fake = types.SimpleNamespace(identity=identity, config=types.SimpleNamespace(hidden_size=H))
    save_router(Router(fake, router.head, router.state, router.registry, router.policy), tmp_path)
    assert ckpt.read_metadata(tmp_path)["encoder"] == identity
    asked = []
    monkeypatch.setattr(enc_mod, "load_encoder", lambda name, **kw: asked.append((name, kw)) or fake)
    back, _ = restore_router(tmp_path)
    # the identity records no bf16, so the encoder is restored computing in float32, as it was saved
    assert asked == [("org/tiny-encoder", {"matmul_dtype": "float32"})] and back.encoder is fake
    assert restore_router(tmp_path, encoder=None)[0].encoder is None
    with pytest.warns(UserWarning, match="saved with encoder 'org/tiny-encoder'"):
        other = types.SimpleNamespace(identity={"name": "other"}, config=fake.config)
        assert restore_router(tmp_path, encoder=other)[0].encoder is other


# ---- steps --------------------------------------------------------------------------------


def test_keep_last_n_and_latest_by_default(built, tmp_path):
    router, x, p_tok = built
    assert list_steps(tmp_path) == [] and list_steps(tmp_path / "missing") == []
    for i in range(5):
        r = Router(None, router.head, router.state, router.registry,
                   router.policy.replace(cost_weight=float(i)))
        assert save_router(r, tmp_path, keep=2) == i + 1
    assert list_steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
    assert restore_router(tmp_path)[0].policy.cost_weight == 4.0  # latest = step 5
    assert restore_router(tmp_path, step=4)[0].policy.cost_weight == 3.0
    assert restore_router(tmp_path / "4")[0].policy.cost_weight == 3.0  # a step folder itself
    assert save_router(router, tmp_path, step=10, keep=None) == 10
    assert list_steps(tmp_path) == [4, 5, 10]
    with pytest.raises(CheckpointError, match="step 10 already exists"):
        save_router(router, tmp_path, step=10)
    with pytest.raises(ValueError, match="keep"):
        save_router(router, tmp_path, keep=0)


def test_no_checkpoint_and_unknown_step(built, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .*does not exist"):
        restore_router(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no checkpoint in .*no finished step"):
        restore_router(tmp_path)
    (tmp_path / ("1" + steps.TMP_MARK)).mkdir()
    with pytest.raises(CheckpointError, match=r"no finished step; unfinished saves ignored: \['1\.orbax"):
        restore_router(tmp_path)
    save_router(built[0], tmp_path)
    with pytest.raises(CheckpointError, match=r"no step 7 in .*\(steps: \[1\]\)"):
        restore_router(tmp_path, step=7)


# ---- killed mid-save ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["writing", "commit"])
def test_killed_mid_save_leaves_previous_step(built, tmp_path, mode):
    """A real child process saving step 2 is SIGKILLed; step 1 stays the restorable latest."""
    router, x, p_tok = built
    directory = tmp_path / "ckpt"
    save_router(router, directory, extras=make_extras())
    marker = tmp_path / "marker"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, str(CHILD), str(directory), mode, str(marker)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            tmp = directory / ("2" + steps.TMP_MARK)
            deadline = time.time() + 120
            while True:
                if mode == "commit" and marker.exists():
                    break  # everything written, the commit rename held back
                if mode == "writing" and tmp.is_dir() and any(
                        f.is_file() and f.parent != tmp for f in tmp.rglob("*")):
                    break  # array files of the new step have begun to appear
                assert child.poll() is None, (
                    f"child exited ({child.returncode}) before it was killed:\n{(tmp_path / 'child.log').read_text()}")
                assert time.time() < deadline, "child never started saving"
                time.sleep(0.001)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not Path(str(marker) + ".done").exists()
    assert tmp.is_dir() and not (directory / "2").exists()  # half-written, never committed

    assert list_steps(directory) == [1]
    back, extras = restore_router(directory)
    assert_same_decisions(router, back, x, p_tok)
    assert "big" not in extras
    with pytest.raises(CheckpointError, match="no step 2"):
        restore_router(directory, step=2)
    # the next save clears the leftover and commits step 2
    assert save_router(back, directory) == 2
    assert list_steps(directory) == [1, 2] and not tmp.exists()
    assert_same_decisions(router, restore_router(directory)[0], x, p_tok)


# ---- errors -------------------------------------------------------------------------------


@pytest.fixture
def saved(built, tmp_path):
    save_router(built[0], tmp_path, extras=make_extras())
    return tmp_path, tmp_path / "1"


def _largest_data_file(item_dir: Path) -> Path:
    """The biggest file of the item's OCDBT store, the one restore reads (ocdbt.process_0/ holds
    the per-process originals Orbax merged into it, unused on restore)."""
    return max((item_dir / "d").iterdir(), key=lambda f: f.stat().st_size)


def test_garbled_array_file(saved):
    directory, step_dir = saved
    f = _largest_data_file(step_dir / "state")
    blob = bytearray(f.read_bytes())
    mid = len(blob) // 2
    blob[mid: mid + 16] = bytes(b ^ 0xFF for b in blob[mid: mid + 16])
    f.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="step 1 .* is corrupted"):
        restore_router(directory)


def test_deleted_array_file(saved):
    directory, step_dir = saved
    _largest_data_file(step_dir / "extras").unlink()
    with pytest.raises(CheckpointError, match="step 1 .* is corrupted or truncated"):
        restore_router(directory)


def test_changed_array_values_fail_the_checksum(saved, monkeypatch):
    """Values that still decode but differ from what was saved are caught by the manifest."""
    directory, _ = saved
    import orbax.checkpoint as ocp

    restore = ocp.CheckpointManager.restore

    def tampered(self, step, *a, **kw):
        out = restore(self, step, *a, **kw)
        if "state" in out.keys():
            out["state"]["B"] = out["state"]["B"] + 1
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "restore", tampered)
    with pytest.raises(CheckpointError, match="array state/B fails its checksum"):
        restore_router(directory)


def test_truncated_metadata(saved):
    directory, step_dir = saved
    meta = step_dir / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated: its metadata .* cannot be read"):
        restore_router(directory)
    meta.unlink()
    with pytest.raises(CheckpointError, match="metadata file .* is missing"):
        restore_router(directory)


def test_deleted_item_folder(saved):
    directory, step_dir = saved
    import shutil

    shutil.rmtree(step_dir / "head")
    with pytest.raises(CheckpointError, match="item folder 'head' is missing"):
        restore_router(directory)


def test_incompatible_format_version(saved):
    directory, step_dir = saved
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 999
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 999.*reads format versions 4 and 5"):
        restore_router(directory)
    meta["format_version"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="without a metadata checksum by an older mixllm_jax"):
        restore_router(directory)
    meta["format_version"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="domain centroids are in the tag head's feature space"):
        restore_router(directory)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["router_config"].update(future_option=1), r"unknown router config keys \['future_option'\]"),
    (lambda m: m["registry"]["slots"].update(ghost=3), "corrupted: registry"),
    (lambda m: m["state"].update(load_slots=8), "corrupted: state arrays have shape"),
    (lambda m: m.pop("registry"), r"corrupted: its metadata lacks \['registry'\]"),
])
def test_inconsistent_metadata(saved, edit, message):
    """Metadata edited and its checksum recomputed (a bug, not an attack) is still caught by the
    consistency checks."""
    directory, step_dir = saved
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta[ckpt.META_CHECKSUM] = ckpt.meta_checksum(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        restore_router(directory)


def _swap_slots(m):
    slots = m["registry"]["slots"]
    a, b = list(slots)[:2]
    slots[a], slots[b] = slots[b], slots[a]


def _rename(m):
    slots = m["registry"]["slots"]
    name = next(iter(slots))
    slots["renamed"] = slots.pop(name)


@pytest.mark.parametrize("edit", [_swap_slots, _rename, lambda m: m["policy"].update(cost_weight=1e6),
                                  lambda m: m["arrays"]["state"]["B"].update(crc32=0),
                                  lambda m: m.pop(ckpt.META_CHECKSUM),
                                  lambda m: m.update({ckpt.META_CHECKSUM: "0" * 64})])
def test_edited_metadata_fails_its_checksum(saved, edit):
    """Issue 12 #6: an edited metadata file (swapped slots, a renamed model, another cost weight,
    a forged manifest) restored silently as a different router; now it is a CheckpointError."""
    directory, step_dir = saved
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="metadata .* fails its checksum"):
        restore_router(directory)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        ckpt.read_metadata(directory)


def test_metadata_bit_flips_never_restore_silently(built, saved):
    """Issue 12 #6: 200 single-bit flips of the metadata file: each one is a CheckpointError (the
    file unreadable, or its checksum fails), never a different router nor a raw KeyError."""
    directory, step_dir = saved
    meta_file = step_dir / "meta" / "metadata"
    blob = meta_file.read_bytes()
    rng = np.random.default_rng(12)
    outcomes = {}
    for pos, bit in zip(rng.integers(0, len(blob), 200), rng.integers(0, 8, 200)):
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << int(bit)
        meta_file.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError) as e:
            ckpt.read_metadata(directory)
        key = "checksum" if "fails its checksum" in str(e.value) else "unreadable"
        outcomes[key] = outcomes.get(key, 0) + 1
    meta_file.write_bytes(blob)
    assert sum(outcomes.values()) == 200 and outcomes.get("checksum", 0) > 50, outcomes
    assert restore_router(directory)[0].registry.slots == built[0].registry.slots


@pytest.mark.slow
def test_bit_flips_anywhere_in_a_step_are_caught_or_harmless(built, saved):
    """60 single-bit flips in any file of a step (arrays, Orbax's own metadata, ours): each restore
    either raises CheckpointError or gives back exactly the saved router."""
    router, x, p_tok = built
    directory, step_dir = saved
    files = sorted(f for f in step_dir.rglob("*") if f.is_file() and f.stat().st_size)
    rng = np.random.default_rng(7)
    caught = same = 0
    for _ in range(60):
        f = files[int(rng.integers(len(files)))]
        blob = f.read_bytes()
        flipped = bytearray(blob)
        flipped[int(rng.integers(len(blob)))] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(flipped))
        try:
            got, _ = restore_router(directory)
        except CheckpointError:
            caught += 1
        else:
            assert got.registry.slots == router.registry.slots and got.policy == router.policy
            assert_same_leaves({k: getattr(got.state, k) for k in ("A", "A_inv", "B", "price_in", "active")},
                               {k: getattr(router.state, k) for k in ("A", "A_inv", "B", "price_in", "active")})
            same += 1
        finally:
            f.write_bytes(blob)
    assert caught + same == 60 and caught > 0


def test_wrong_feature_dimension(built, saved):
    directory, _ = saved
    d = built[1].shape[1]
    with pytest.raises(CheckpointError, match=f"feature dimension d={d} .*expected {d + 1}"):
        restore_router(directory, expected_dim=d + 1)
    other = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=384),
                                  identity={"name": "some-384-encoder", "hidden_size": 384})
    with pytest.raises(CheckpointError, match=f"embeddings of dimension {H}.*'some-384-encoder' gives dimension 384"):
        restore_router(directory, encoder=other)
    assert restore_router(directory, expected_dim=d)[0].state.dim == d


def test_capacity_smaller_is_an_error_larger_routes_identically(built, saved):
    router, x, p_tok = built
    directory, _ = saved
    with pytest.raises(CheckpointError, match="capacity 4; cannot restore into the smaller capacity 2"):
        restore_router(directory, capacity=2)
    big, _ = restore_router(directory, capacity=16)
    assert big.state.capacity == 16 and big.registry.capacity == 16
    assert big.registry.slots == router.registry.slots
    # bit-identical to growing the original in memory
    grown = Router(None, router.head, S.grow(router.state, 16), router.registry, router.policy)
    assert_same_decisions(grown, big, x, p_tok)
    # and the same choices as before growing; XLA compiles K=16 differently from K=4, so the
    # per-arm numbers may differ in the last bit
    a, b = (engine.route(r.state, x, p_tok, r.policy) for r in (router, big))
    np.testing.assert_array_equal(np.asarray(a.arm), np.asarray(b.arm))
    np.testing.assert_allclose(np.asarray(b.score)[:, :4], np.asarray(a.score), rtol=1e-5, atol=1e-6)
    assert np.all(np.isneginf(np.asarray(b.score)[:, 4:]))
    # the grown router takes new LLMs in the new slots
    st, reg = S.add_llm(big.state, big.registry, "new", price_in=1e-7, price_out=1e-7)
    assert reg.slots["new"] == 3 and st.capacity == 16


def test_a_format_4_state_gets_the_shared_component_at_its_prior():
    """Format 4 predates the shared online component: it is added at its prior (predicting 0), the
    saved arms untouched; a format-5 state is read as it is."""
    import numpy as np
    from mixllm_jax.core import bandit, state as S

    st = S.init_state(4, 6, ridge=np.arange(1, 7, dtype=np.float32))
    v4 = {f: np.asarray(getattr(st, f)) for f in ("A", "A_inv", "B", "count", "active", "price_in", "price_out", "ttft",
                                                 "tokens_per_s", "max_concurrency", "free_at", "clock", "ridge", "noise")}
    up = ckpt.upgrade_state(4, v4)
    restored = S.RouterState(**up)
    np.testing.assert_array_equal(np.asarray(restored.shared_A), np.diag(np.arange(1, 7, dtype=np.float32)))
    np.testing.assert_array_equal(np.asarray(bandit.shared_theta(restored)), np.zeros((6, 2)))
    assert all(up[f] is v4[f] for f in v4)
    five = {**v4, "shared_A": 1, "shared_A_inv": 2, "shared_B": 3}
    assert ckpt.upgrade_state(5, five) is five

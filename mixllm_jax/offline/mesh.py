"""Sharded compute over a device mesh: routing, the fused text-to-decision path and exact updates.

One 2-D mesh with axes ("batch", "arms") covers every layout:

    make_mesh(4)            4 x 1: data-parallel. Queries (and log rows) are split over the
                            devices, the state is replicated.
    make_mesh(4, arms=4)    1 x 4: arm-parallel. The K axis of every per-arm array (A_inv, A, B,
                            prices, load...) is split, so each device holds K/4 of the K d^2
                            floats: for many LLMs or a large d.
    make_mesh(4, arms=2)    2 x 2: both.

Routing (`route_batch`, `route_text_batch`): a `shard_map` computes each device's block of the
[B, K] score terms (`policy.score_terms`: the B K d^2 LinUCB widths, all of the heavy work) from its
rows and its arms, with no communication; the decision over arms (`policy.choose`: latency penalty,
exploration draws, argmax or the in-batch load assignment, which is sequential over the batch and so
runs on the gathered [B, K] scores) follows in the same jitted computation. Both steps are
route_batch's own functions, so the formula has one source, and the decisions equal the unsharded
ones (float32 rounding of the widths aside): for greedy and UCB always; for stochastic policies
(Thompson, softmax, epsilon) when given the same key and the same padded batch size B, since the
draws are made for the whole [B, K] batch from the key as `policy.route_batch` makes them
(`route` pads B to a multiple of the mesh's batch shards, which can differ from engine.route's
bucket for tiny batches: the draws then differ, equally valid).

Updates (`update_batch`): method "woodbury" (default; the rows gathered, each arm block updated by
the exact Woodbury steps of `bandit.update_batch`) or "stats": per-arm sufficient statistics
S_k = sum w x x^T, R_k = sum w x y^T and counts, computed from each device's rows for its arms and
summed over the "batch" axis (psum), then applied exactly: A += S, B += R, count += n, and A_inv
recomputed from A (`bandit.spd_inverse`) for the arms that received observations. Both equal the
unsharded update and the closed-form ridge within float32 tolerance. A refresh costs K d^3 per batch
and narrow (one arm per row) statistics K-fold one-hot work, so for batches of a few thousand rows
the Woodbury steps are cheaper.

Offline training (`arm_stats`): `fit.arm_stats` of a log (X^T W X, X^T W Y, sum w y^2 and counts per
LLM) with the rows split over "batch" and the LLMs over "arms", psum-reduced over "batch";
`train.train_router(arm_stats=...)` fits the arms from them (the evidence ridge, the cross-fitted
folds) as it does from the unsharded ones. The sums are additive, so `mixllm_jax.offline.distributed` adds
those of several hosts.

Shapes: B must be a multiple of the mesh's batch size and K of its arms size (`route`, `update`
and `arm_stats` pad B; `state.grow` pads K). Every entry point is jit-compiled once per (mesh,
shapes, static policy field); `TRACES` counts the traces by entry point.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixllm_jax.core import bandit, engine, fit
from mixllm_jax.core import policy as policy_mod
from mixllm_jax.core.padding import bucket, pad_rows
from mixllm_jax.core.policy import Decision, Policy
from mixllm_jax.core.state import ARMLESS_FIELDS, RouterState

BATCH, ARMS = "batch", "arms"
STATS_BLOCK = 512  # rows per step of the statistics scan: bounds the [rows, K, d] intermediate
TRACES: collections.Counter = collections.Counter()  # traces (= compilations) per entry point

_DECISION_BK = ("quality", "tokens", "cost", "uncertainty", "wait", "penalty", "score", "bonus",
                "eligible")  # [B, K] fields


def _shard_map(f, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):  # jax >= 0.7
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map  # older jax
    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# ---- the mesh and the state's layout -----------------------------------------------------------

def make_mesh(devices: int | Sequence | None = None, *, arms: int = 1) -> Mesh:
    """A ("batch", "arms") mesh over `devices`: a count of this process's devices
    (jax.local_devices()), a list of devices, or None (all of this process's).

    arms: devices along the arm axis (1: data-parallel only); the rest go along the batch axis.
    """
    all_devs = jax.local_devices()
    if devices is None:
        devs = all_devs
    elif isinstance(devices, (int, np.integer)):
        if not 1 <= devices <= len(all_devs):
            raise ValueError(f"devices must be in [1, {len(all_devs)}] (jax.local_devices() on "
                             f"{jax.default_backend()}), got {devices}; on CPU, more host devices come "
                             f"from XLA_FLAGS=--xla_force_host_platform_device_count=N")
        devs = all_devs[: int(devices)]
    else:
        devs = list(devices)
    n = len(devs)
    if not isinstance(arms, (int, np.integer)) or arms < 1 or n % arms:
        raise ValueError(f"arms must be a positive divisor of the {n} devices, got {arms!r}")
    grid = np.array(devs, dtype=object).reshape(n // arms, arms)
    if hasattr(jax.sharding, "AxisType"):  # Auto: shardings propagate through jit (GSPMD)
        return Mesh(grid, (BATCH, ARMS), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return Mesh(grid, (BATCH, ARMS))


def batch_size(mesh: Mesh) -> int:
    return int(mesh.shape[BATCH])


def arm_size(mesh: Mesh) -> int:
    return int(mesh.shape[ARMS])


def state_specs() -> RouterState:
    """PartitionSpecs of a RouterState: the leading arm axis on "arms", the arm-less fields replicated."""
    return RouterState(**{f.name: P() if f.name in ARMLESS_FIELDS else P(ARMS)
                          for f in dataclasses.fields(RouterState)})


def state_sharding(mesh: Mesh) -> RouterState:
    """NamedShardings of a RouterState on `mesh` (a pytree like the state)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs())


def shard_state(state: RouterState, mesh: Mesh) -> RouterState:
    """Place the state on the mesh: per-arm arrays split over "arms" (replicated over "batch")."""
    _check_arms(state, mesh)
    return jax.device_put(state, state_sharding(mesh))


def unshard(tree):
    """Host (numpy) copies of every array of a pytree, whatever its sharding."""
    return jax.tree.map(np.asarray, tree)


def _check_arms(state: RouterState, mesh: Mesh):
    if state.capacity % arm_size(mesh):
        raise ValueError(f"the state's capacity K = {state.capacity} must be a multiple of the mesh's "
                         f"{arm_size(mesh)} arm shards (state.grow pads it)")


def _check_batch(n: int, mesh: Mesh, what: str = "batch"):
    if n % batch_size(mesh):
        raise ValueError(f"the {what} size {n} must be a multiple of the mesh's {batch_size(mesh)} "
                         f"batch shards (mesh.route / mesh.update pad it)")


def _constrain(x, mesh, spec):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---- routing -----------------------------------------------------------------------------------

def _decide(mesh, state: RouterState, terms, policy: Policy, book, key) -> Decision:
    """The decision over all arms from the [B, K] score terms (`policy.choose`)."""
    quality, tokens, cost, width, base = terms
    if policy.in_batch_load:  # sequential over the batch: on the gathered scores, on every device
        rep = P()
        base, width, tokens, book = (_constrain(a, mesh, rep) for a in (base, width, tokens, book))
        state = state.replace(free_at=_constrain(state.free_at, mesh, rep))
    d = policy_mod.choose(state, quality, tokens, cost, width, base, policy, book, key)
    bk, row = P(BATCH, ARMS), P(BATCH)
    return d.replace(**{k: _constrain(getattr(d, k), mesh, bk) for k in _DECISION_BK},
                     arm=_constrain(d.arm, mesh, row), propensity=_constrain(d.propensity, mesh, row),
                     free_at=_constrain(d.free_at, mesh, P(ARMS)))


@functools.lru_cache(maxsize=None)
def _route_fn(mesh: Mesh, with_bonus: bool):
    sspec, row, bk = state_specs(), P(BATCH), P(BATCH, ARMS)
    specs = (sspec, row, row, P()) + ((bk,) if with_bonus else ())
    local = _shard_map(policy_mod.score_terms, mesh, specs, (bk,) * 5)

    def fn(state, x, prompt_tokens, policy, book, bonus, key):
        TRACES["route_batch"] += 1
        book = jnp.ones((x.shape[0],), bool) if book is None else book
        args = (state, x, prompt_tokens, policy) + ((bonus,) if with_bonus else ())
        return _decide(mesh, state, local(*args), policy, book, key)

    return jax.jit(fn)


def route_batch(state: RouterState, x, prompt_tokens, policy: Policy, book=None, bonus=None, key=None, *,
                mesh: Mesh) -> Decision:
    """`policy.route_batch` over `mesh`: x [B, d] split over "batch", the arms over "arms".

    Unchecked; B a multiple of the mesh's batch size and K of its arm size. The state is placed
    with `shard_state` (free when it already is: keep the placed state to avoid the copies).
    """
    _check_batch(x.shape[0], mesh)
    state = shard_state(state, mesh)  # a no-op when it is in place; else one layout, one compile
    return _route_fn(mesh, bonus is not None)(state, x, prompt_tokens, policy, book, bonus, key)


def padded_size(n: int, mesh: Mesh) -> int:
    """engine's batch bucket for n rows, rounded up to a multiple of the mesh's batch size."""
    nb = batch_size(mesh)
    return -(-bucket(n) // nb) * nb


def route(state: RouterState, x, prompt_tokens, policy: Policy, bonus=None, key=None, *, mesh: Mesh) -> Decision:
    """Checked, bucketed `route_batch` on the mesh (`engine.route`'s checks): sliced to the B real rows."""
    x, prompt_tokens, bonus, key = engine.check_route(state, x, prompt_tokens, policy, bonus, key)
    n = x.shape[0]
    size = padded_size(n, mesh)
    if bonus is not None:
        bonus = pad_rows(bonus, size)
    d = route_batch(state, pad_rows(x, size), pad_rows(prompt_tokens, size), policy,
                    np.arange(size) < n, bonus, key, mesh=mesh)
    return d.replace(**{k: getattr(d, k)[:n] for k in engine.DECISION_ROWS})


# ---- the fused text-to-decision path -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _text_fn(mesh: Mesh, enc_config, head_shape, mode: str):
    from mixllm_jax.text import encoder as enc_mod
    from mixllm_jax.text.router import featurize

    sspec, row, bk = state_specs(), P(BATCH), P(BATCH, ARMS)
    has_head = head_shape is not None

    def local(enc_params, state, ids, mask, prompt_tokens, policy, *head):
        e = enc_mod.embed_ids(enc_params, enc_config, ids, mask)
        x, domain = featurize(e, *(head or (None, None)), head_shape=head_shape, mode=mode)
        return policy_mod.score_terms(state, x, prompt_tokens, policy) + ((domain,) if has_head else ())

    specs = (P(), sspec, row, row, row, P()) + ((P(), P()) if has_head else ())
    sharded = _shard_map(local, mesh, specs, (bk,) * 5 + ((row,) if has_head else ()))

    def fn(enc_params, head_params, centroids, state, ids, mask, prompt_tokens, policy, book, key):
        TRACES["route_text_batch"] += 1
        book = jnp.ones((ids.shape[0],), bool) if book is None else book
        out = sharded(enc_params, state, ids, mask, prompt_tokens, policy,
                      *((head_params, centroids) if has_head else ()))
        return _decide(mesh, state, out[:5], policy, book, key), (out[5] if has_head else None)

    return jax.jit(fn)


def route_text_batch(enc_params, head_params, centroids, state: RouterState, ids, mask, prompt_tokens,
                     policy: Policy, book=None, key=None, *, enc_config, head_shape, mode, mesh: Mesh):
    """`router.route_text_batch` over `mesh`: ids, mask [B, L] split over "batch" (encoder, head and
    scores per device, the encoder replicated over "arms"), the arms over "arms".

    Returns (Decision, nearest domain [B] or None).
    """
    _check_batch(ids.shape[0], mesh)
    state = shard_state(state, mesh)
    return _text_fn(mesh, enc_config, head_shape, mode)(
        enc_params, head_params, centroids, state, ids, mask, prompt_tokens, policy, book, key)


def decide(router, texts: Sequence[str], *, mesh: Mesh, policy: Policy | None = None, key=None):
    """`Router.decide` over the mesh: texts -> (Decision, domain | None), padding rows kept."""
    ids, mask, prompt_tokens = router.tokenize(texts)
    size = -(-ids.shape[0] // batch_size(mesh)) * batch_size(mesh)
    ids, mask, prompt_tokens = (pad_rows(a, size) for a in (ids, mask, prompt_tokens))
    (params, centroids), static = router.head_args()
    return route_text_batch(router.encoder.params, params, centroids, router.state, ids, mask, prompt_tokens,
                            policy or router.policy, np.arange(size) < len(texts), key,
                            enc_config=router.encoder.config, mesh=mesh, **static)


# ---- updates: sufficient statistics, reduced, applied exactly -----------------------------------

def _block_sums(block, *rows):
    """The sum over blocks of STATS_BLOCK rows of block(*rows of the block) (a pytree): bounds the
    [rows, k, d] intermediates. The leading (row) axis must be one block or a whole number of them."""
    n = rows[0].shape[0]
    blk = min(n, STATS_BLOCK)
    blocks = [a.reshape((n // blk, blk) + a.shape[1:]) for a in rows]
    with jax.default_matmul_precision("highest"):  # exact float32 sums (no TF32 on GPUs)
        # the first block starts the sums (its type carries the mesh axes the rows vary over)
        first = block(*(a[0] for a in blocks))
        if n == blk:
            return first
        step = lambda acc, b: (jax.tree.map(jnp.add, acc, block(*b)), None)  # noqa: E731
        return jax.lax.scan(step, first, [a[1:] for a in blocks])[0]


def _update_stats(x, m, y):
    """Per-arm statistics of rows x [n, d] with arm weights m [n, k] (0: not this arm) and targets
    y [n, T]: S [k, d, d], R [k, d, T], c [k] (rows of weight > 0)."""
    xm = m[:, :, None] * x[:, None, :]  # [n, k, d]
    return (jnp.einsum("bki,bj->kij", xm, x), jnp.einsum("bki,bt->kit", xm, y),
            (m > 0).sum(0).astype(jnp.float32))


def _on_cpu(mesh: Mesh) -> bool:
    return mesh.devices.flat[0].platform == "cpu"


def _apply_local(state: RouterState, S, R, c, one_by_one: bool = False) -> RouterState:
    """A += S, B += R, count += c; A_inv recomputed from A where c > 0 (untouched elsewhere).

    one_by_one (meshes of CPU devices): the arms' inverses in a lax.map, one eigh at a time. jax's
    CPU eigh splits a batch of matrices over XLA's intra-op thread pool and waits for the pieces;
    with several host devices the pool's threads can all be held by device executions waiting on
    this one, and the process hangs (seen about every other run at K = 16, d = 384 on 4 host
    devices: gdb showed ssyevd's ParallelBatchMap waiting with every pool thread parked).
    """
    A = state.A + S
    with jax.default_matmul_precision("highest"):
        fresh = jax.lax.map(bandit.spd_inverse, A) if one_by_one else bandit.spd_inverse(A)
    fresh = 0.5 * (fresh + jnp.swapaxes(fresh, 1, 2))
    A_inv = jnp.where((c > 0)[:, None, None], fresh, state.A_inv)
    return state.replace(A=A, A_inv=A_inv, B=state.B + R, count=state.count + c)


def _local_arm_weights(arm, w, k_local):
    """One-hot weights [n, k_local] of the rows' arms among this device's block of arms."""
    k0 = jax.lax.axis_index(ARMS) * k_local
    return jax.nn.one_hot(arm - k0, k_local, dtype=jnp.float32) * w[:, None]


def _rows_multiple(n: int, mesh: Mesh) -> int:
    """Rows padded so each device's share is one block or a whole number of blocks."""
    nb = batch_size(mesh)
    per = -(-n // nb)
    if per > STATS_BLOCK:
        per = -(-per // STATS_BLOCK) * STATS_BLOCK
    return per * nb


@functools.lru_cache(maxsize=None)
def _update_fn(mesh: Mesh):
    """method="stats": the statistics of each device's rows for its arms, psum over "batch", and
    their exact apply, in one program."""
    sspec, row = state_specs(), P(BATCH)
    upd = P(ARMS)

    def local(state, x, arm, targets, w):
        S, R, c = _block_sums(_update_stats, x, _local_arm_weights(arm, w, state.capacity), targets)
        S, R, c = (jax.lax.psum(a, BATCH) for a in (S, R, c))
        new = _apply_local(state, S, R, c, one_by_one=_on_cpu(mesh))
        return new.A, new.A_inv, new.B, new.count

    sharded = _shard_map(local, mesh, (sspec, row, row, row, row), (upd,) * 4)

    def fn(state, x, arm, targets, weight):
        TRACES["update_batch"] += 1
        n = x.shape[0]
        w = jnp.ones((n,), jnp.float32) if weight is None else weight.astype(jnp.float32)
        state, targets = bandit.split(state, x.astype(jnp.float32), arm, targets.astype(jnp.float32), w)
        size = _rows_multiple(n, mesh)
        A, A_inv, B, count = sharded(state, pad_rows(x.astype(jnp.float32), size),  # weight 0: no-ops
                                     pad_rows(arm.astype(jnp.int32), size),
                                     pad_rows(targets.astype(jnp.float32), size), pad_rows(w, size))
        return state.replace(A=A, A_inv=A_inv, B=B, count=count)

    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _woodbury_fn(mesh: Mesh):
    sspec, rep = state_specs(), P()
    upd = P(ARMS)

    def local(state, x, arm, targets, w):
        k_local = state.capacity
        k0 = jax.lax.axis_index(ARMS) * k_local
        mine = (arm >= k0) & (arm < k0 + k_local)  # other blocks' rows: weight 0, skipped
        new = bandit.update_arms(state, x, jnp.where(mine, arm - k0, 0), targets, jnp.where(mine, w, 0.0))
        return new.A, new.A_inv, new.B, new.count

    sharded = _shard_map(local, mesh, (sspec, rep, rep, rep, rep), (upd,) * 4)

    def fn(state, x, arm, targets, weight):
        TRACES["update_batch_woodbury"] += 1
        w = jnp.ones((x.shape[0],), jnp.float32) if weight is None else weight.astype(jnp.float32)
        state, targets = bandit.split(state, x.astype(jnp.float32), arm, targets.astype(jnp.float32), w)
        A, A_inv, B, count = sharded(state, x.astype(jnp.float32), arm.astype(jnp.int32),
                                     targets.astype(jnp.float32), w)
        return state.replace(A=A, A_inv=A_inv, B=B, count=count)

    return jax.jit(fn)


UPDATE_METHODS = ("woodbury", "stats")


def update_batch(state: RouterState, x, arm, targets, weight=None, *, mesh: Mesh,
                 method: str = "woodbury") -> RouterState:
    """`bandit.update_batch` over `mesh`. Unchecked (see `update`); rows of weight 0 are skipped.

    method "woodbury" (default): the rows (B x (d + T + 2) floats) go to every device and each
      applies the exact rank-m Woodbury steps of `bandit.update_batch` to its block of arms: the
      arm axis splits the work, the batch axis repeats it (the replicated state stays identical).
    method "stats": each device sums its rows' statistics (S_k = X^T W X, R_k = X^T W Y, counts)
      for its arms, the sums are reduced over "batch" (psum) and applied exactly: A += S, B += R,
      A_inv recomputed from A for the arms observed. The batch axis splits the sums, but each
      device does one-hot work for all its arms (B K_local d^2) and a refresh of K_local d^3:
      worth it for wide batch axes and large batches.
    Both first `bandit.split` the rows (the shared component's step and the arms' targets) and
    equal the unsharded update within float32 tolerance.
    """
    if method not in UPDATE_METHODS:
        raise ValueError(f"method must be one of {UPDATE_METHODS}, got {method!r}")
    fn = _update_fn(mesh) if method == "stats" else _woodbury_fn(mesh)
    return fn(shard_state(state, mesh), x, arm, targets, weight)


def update(state: RouterState, x, arm, targets, weight=None, *, mesh: Mesh, method: str = "woodbury"
           ) -> RouterState:
    """Checked, bucketed `update_batch` on the mesh (`engine.update`'s checks)."""
    x, arm, targets, w = engine.check_update(state, x, arm, targets, weight)
    size = _rows_multiple(bucket(x.shape[0]), mesh)  # bounded set of shapes, as engine.update
    return update_batch(state, pad_rows(x, size), pad_rows(arm, size), pad_rows(targets, size),
                        pad_rows(w, size), mesh=mesh, method=method)


# ---- offline training: the statistics of a whole log ------------------------------------------

@functools.lru_cache(maxsize=None)
def _arm_stats_fn(mesh: Mesh):
    row, rm = P(BATCH), P(BATCH, ARMS)

    def local(x, y, obs):
        return tuple(jax.lax.psum(a, BATCH) for a in _block_sums(fit.sufficient_stats, x, y, obs))

    sharded = _shard_map(local, mesh, (row, rm, rm), (P(ARMS),) * 4)

    def fn(x, y, obs):
        TRACES["arm_stats"] += 1
        return sharded(x, y, obs)

    return jax.jit(fn)


def arm_stats(x, quality, log_tokens, *, mesh: Mesh):
    """`fit.arm_stats` over `mesh`: x [N, d]; quality, log_tokens [N, M] (NaN quality: not observed).

    The rows go over "batch" (padded with unobserved rows to whole blocks per device), the M LLMs
    over "arms" (padded with unobserved columns); each device sums its block, the blocks are
    psum-reduced over "batch". Returns (S [M, d, d], b [M, d, T], yy [M, T], n [M]) as fit.arm_stats,
    equal to it within float32 rounding, as host arrays: the fit that follows (eigh per arm and
    ridge) runs on one device (CPU eigh sharded over host devices can deadlock, see _apply_local).
    For `train.train_router(arm_stats=...)`.
    """
    y, obs = fit.log_targets(np.asarray(quality), np.asarray(log_tokens))
    x = np.asarray(x, np.float32)
    n, M = obs.shape
    cols = -(-M // arm_size(mesh)) * arm_size(mesh)
    rows = _rows_multiple(n, mesh)
    pad = lambda a: pad_rows(pad_rows(a, cols, axis=1), rows)  # unobserved rows and LLMs  # noqa: E731
    out = _arm_stats_fn(mesh)(pad_rows(x, rows), pad(y), pad(obs))
    return tuple(np.asarray(a)[:M] for a in out)


# ---- the encoder, data-parallel ----------------------------------------------------------------

def shard_encoder(encoder, mesh: Mesh):
    """A copy of an `encoder.Encoder` whose batches are split over the mesh's devices (params
    replicated; every device of the mesh gets rows). Batches whose size is not a multiple of the
    device count (the last, small one) run unsplit. Its `embed` (and so `cache.embed_cached`) is
    the original's; embeddings equal the unsharded ones within float32 rounding.
    """
    import copy

    flat = make_mesh(list(mesh.devices.flat))  # every device on "batch"
    n = batch_size(flat)
    rows = NamedSharding(flat, P(BATCH))
    params = jax.device_put(encoder.params, NamedSharding(flat, P()))
    inner = encoder._embed

    def embed(_params, ids, mask):
        if ids.shape[0] % n:
            return inner(encoder.params, ids, mask)
        return inner(params, jax.device_put(ids, rows), jax.device_put(mask, rows))

    enc = copy.copy(encoder)
    enc._embed = embed
    return enc

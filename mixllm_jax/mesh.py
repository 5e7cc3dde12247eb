"""Sharded compute over a device mesh: routing, the fused text-to-decision path and exact updates.

One 2-D mesh with axes ("batch", "arms") covers every layout:

    make_mesh(4)            4 x 1: data-parallel. Queries (and log rows) are split over the
                            devices, the state is replicated.
    make_mesh(4, arms=4)    1 x 4: arm-parallel. The K axis of every per-arm array (A_inv, A, B,
                            prices, load...) is split, so each device holds K/4 of the K d^2
                            floats: for many LLMs or a large d.
    make_mesh(4, arms=2)    2 x 2: both.

Routing (`route_batch`, `route_text_batch`): a `shard_map` computes each device's block of the
[B, K] score terms (the B K d^2 LinUCB widths: all of the heavy work) from its rows and its arms,
with no communication; the decision over arms (argmax, or the in-batch load assignment, which is
sequential over the batch and so runs on the gathered [B, K] scores) follows in the same jitted
computation. The per-block scores come from `policy.route_batch` itself, so the formula has one
source. The decisions equal the unsharded ones (float32 rounding of the widths aside).

Updates (`fill_arms`, `update_batch(method="stats")`): per-arm sufficient statistics
S_k = sum w x x^T, R_k = sum w x y^T and counts, computed from each device's rows for its arms and
summed over the "batch" axis (psum), then applied exactly: A += S, B += R, count += n, and A_inv
recomputed from A (`bandit.spd_inverse`) for the arms that received observations. The result
equals the unsharded update (`bandit.update_batch`, Woodbury steps) and the closed-form ridge within
float32 tolerance. Statistics are additive, so `stats` + `apply_stats` also merge work done on
several hosts (see `mixllm_jax.distributed`). Online batches default to `method="woodbury"` (the
rows gathered, each arm block updated by its own Woodbury steps): a refresh costs K d^3 per batch
and narrow (one arm per row) statistics K-fold one-hot work, so for batches of a few thousand rows
the Woodbury steps are cheaper; the offline fill, where every query is an observation of every
arm, has no such waste and refreshes once.

Shapes: B must be a multiple of the mesh's batch size and K of its arms size (`route`, `update`
and `fill_arms` pad B; `state.grow` pads K). Every entry point is jit-compiled once per (mesh,
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

from mixllm_jax import bandit, engine, latency
from mixllm_jax import policy as policy_mod
from mixllm_jax.policy import Decision, Policy
from mixllm_jax.state import RouterState

BATCH, ARMS = "batch", "arms"
STATS_BLOCK = 512  # rows per step of the statistics scan: bounds the [rows, K, d] intermediate
TRACES: collections.Counter = collections.Counter()  # traces (= compilations) per entry point

_SCALAR_FIELDS = ("clock", "ridge")  # every other RouterState field has the leading arm axis K
_DECISION_BK = ("quality", "tokens", "cost", "uncertainty", "wait", "penalty", "score")


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
    """PartitionSpecs of a RouterState: the leading arm axis on "arms", scalars replicated."""
    return RouterState(**{f.name: P() if f.name in _SCALAR_FIELDS else P(ARMS)
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

def _local_scores(state: RouterState, x, prompt_tokens, policy: Policy, bonus=None):
    """One device's block of the score terms: (quality, tokens, cost, width, base, service) [b, k].

    `policy.route_batch` on the local rows and arms with beta = 0 and no in-batch load returns
    score == base (quality - lambda cost + alpha width + bonus, -inf on inactive arms) exactly.
    """
    d = policy_mod.route_batch(state, x, prompt_tokens, policy.replace(beta=0.0, in_batch_load=False),
                               None, bonus)
    service = latency.service_time(state.ttft, state.tokens_per_s, d.tokens)
    return d.quality, d.tokens, d.cost, d.uncertainty, d.score, service


def _decide(mesh, state: RouterState, terms, policy: Policy, valid) -> Decision:
    """The decision over all arms from the [B, K] score terms: route_batch's last step."""
    quality, tokens, cost, width, base, service = terms
    if policy.in_batch_load:  # sequential over the batch: on the gathered scores, on every device
        rep = P()
        base, service, free_at, valid = (_constrain(a, mesh, rep) for a in (base, service, state.free_at, valid))
        arm, wait, pen, score, free_at = latency.assign_sequential(
            base, service, free_at, state.clock, policy.beta, policy.tau, valid)
    else:
        wait = jnp.broadcast_to(latency.wait(state.free_at, state.clock), base.shape)
        pen = latency.penalty(wait, policy.tau)
        score = base - policy.beta * pen
        arm = jnp.argmax(score, axis=1)
        free_at = state.free_at
    bk = P(BATCH, ARMS)
    out = dict(quality=quality, tokens=tokens, cost=cost, uncertainty=width, wait=wait, penalty=pen, score=score)
    out = {k: _constrain(v, mesh, bk) for k, v in out.items()}
    return Decision(arm=_constrain(arm.astype(jnp.int32), mesh, P(BATCH)),
                    free_at=_constrain(free_at, mesh, P(ARMS)), **out)


@functools.lru_cache(maxsize=None)
def _route_fn(mesh: Mesh, with_bonus: bool):
    sspec, row, bk = state_specs(), P(BATCH), P(BATCH, ARMS)
    specs = (sspec, row, row, P()) + ((bk,) if with_bonus else ())
    local = _shard_map(_local_scores, mesh, specs, (bk,) * 6)

    def fn(state, x, prompt_tokens, policy, valid, bonus):
        TRACES["route_batch"] += 1
        valid = jnp.ones((x.shape[0],), bool) if valid is None else valid
        args = (state, x, prompt_tokens, policy) + ((bonus,) if with_bonus else ())
        return _decide(mesh, state, local(*args), policy, valid)

    return jax.jit(fn)


def route_batch(state: RouterState, x, prompt_tokens, policy: Policy, valid=None, bonus=None, *,
                mesh: Mesh) -> Decision:
    """`policy.route_batch` over `mesh`: x [B, d] split over "batch", the arms over "arms".

    Unchecked; B a multiple of the mesh's batch size and K of its arm size. The state is placed
    with `shard_state` (free when it already is: keep the placed state to avoid the copies).
    """
    _check_batch(x.shape[0], mesh)
    state = shard_state(state, mesh)  # a no-op when it is in place; else one layout, one compile
    return _route_fn(mesh, bonus is not None)(state, x, prompt_tokens, policy, valid, bonus)


def padded_size(n: int, mesh: Mesh) -> int:
    """engine's batch bucket for n rows, rounded up to a multiple of the mesh's batch size."""
    nb = batch_size(mesh)
    return -(-engine.bucket(n) // nb) * nb


def route(state: RouterState, x, prompt_tokens, policy: Policy, *, mesh: Mesh, bonus=None) -> Decision:
    """Checked, bucketed `route_batch` on the mesh (like `engine.route`): sliced to the B real rows."""
    x = engine._finite_matrix("x", x, (state.dim,))
    n = x.shape[0]
    prompt_tokens = engine._batch_vector("prompt_tokens", prompt_tokens, n)
    if not bool(np.asarray(state.active).any()):
        raise ValueError("state has no active arm to route to")
    for field in ("cost_weight", "alpha", "beta", "tau"):
        v = float(getattr(policy, field))
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"policy.{field} must be finite and >= 0, got {v}")
    size = padded_size(n, mesh)
    if bonus is not None:
        bonus = engine._pad(engine._finite_matrix("bonus", bonus, (state.capacity,)), size)
    d = route_batch(state, engine._pad(x, size), engine._pad(prompt_tokens, size), policy,
                    np.arange(size) < n, bonus, mesh=mesh)
    return d.replace(arm=d.arm[:n], **{k: getattr(d, k)[:n] for k in _DECISION_BK})


# ---- the fused text-to-decision path -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _text_fn(mesh: Mesh, enc_config, head_shape, mode: str):
    from mixllm_jax import encoder as enc_mod
    from mixllm_jax.router import featurize

    sspec, row, bk = state_specs(), P(BATCH), P(BATCH, ARMS)
    has_head = head_shape is not None

    def local(enc_params, state, ids, mask, prompt_tokens, policy, *head):
        e = enc_mod.embed_ids(enc_params, enc_config, ids, mask)
        x, domain = featurize(e, *(head or (None, None)), head_shape=head_shape, mode=mode)
        return _local_scores(state, x, prompt_tokens, policy) + ((domain,) if has_head else ())

    specs = (P(), sspec, row, row, row, P()) + ((P(), P()) if has_head else ())
    sharded = _shard_map(local, mesh, specs, (bk,) * 6 + ((row,) if has_head else ()))

    def fn(enc_params, head_params, centroids, state, ids, mask, prompt_tokens, policy, valid):
        TRACES["route_text_batch"] += 1
        valid = jnp.ones((ids.shape[0],), bool) if valid is None else valid
        out = sharded(enc_params, state, ids, mask, prompt_tokens, policy,
                      *((head_params, centroids) if has_head else ()))
        return _decide(mesh, state, out[:6], policy, valid), (out[6] if has_head else None)

    return jax.jit(fn)


def route_text_batch(enc_params, head_params, centroids, state: RouterState, ids, mask, prompt_tokens,
                     policy: Policy, valid=None, *, enc_config, head_shape, mode, mesh: Mesh):
    """`router.route_text_batch` over `mesh`: ids, mask [B, L] split over "batch" (encoder, head and
    scores per device, the encoder replicated over "arms"), the arms over "arms".

    Returns (Decision, nearest domain [B] or None).
    """
    _check_batch(ids.shape[0], mesh)
    state = shard_state(state, mesh)
    return _text_fn(mesh, enc_config, head_shape, mode)(
        enc_params, head_params, centroids, state, ids, mask, prompt_tokens, policy, valid)


def decide(router, texts: Sequence[str], *, mesh: Mesh, policy: Policy | None = None):
    """`Router.decide` over the mesh: texts -> (Decision, domain | None), padding rows kept."""
    ids, mask, prompt_tokens = router.tokenize(texts)
    size = -(-ids.shape[0] // batch_size(mesh)) * batch_size(mesh)
    ids, mask, prompt_tokens = (engine._pad(a, size) for a in (ids, mask, prompt_tokens))
    (params, centroids), static = router._head_args()
    return route_text_batch(router.encoder.params, params, centroids, router.state, ids, mask, prompt_tokens,
                            policy or router.policy, np.arange(size) < len(texts),
                            enc_config=router.encoder.config, mesh=mesh, **static)


# ---- updates: sufficient statistics, reduced, applied exactly -----------------------------------

def _stats_local(x, m, y):
    """Per-arm statistics of one block of rows: x [n, d], m [n, k] weights (0: no observation),
    y [n, T] (one target row per query) or [n, k, T] (per arm). Returns S [k, d, d], R [k, d, T],
    c [k] (rows of weight > 0). Scans blocks of STATS_BLOCK rows; n must be a multiple of the
    block when larger.
    """
    n = x.shape[0]
    blk = min(n, STATS_BLOCK)
    per_arm = y.ndim == 3

    def block(xb, mb, yb):
        xm = mb[:, :, None] * xb[:, None, :]  # [blk, k, d]
        S = jnp.einsum("bki,bj->kij", xm, xb)
        R = jnp.einsum("bki,bkt->kit", xm, yb) if per_arm else jnp.einsum("bki,bt->kit", xm, yb)
        return S, R, (mb > 0).sum(0).astype(jnp.float32)

    blocks = jax.tree.map(lambda a: a.reshape((n // blk, blk) + a.shape[1:]), (x, m, y))
    with jax.default_matmul_precision("highest"):  # exact float32 sums (no TF32 on GPUs)
        # the first block starts the sums (its type carries the mesh axes the rows vary over)
        first = block(*(a[0] for a in blocks))
        if n == blk:
            return first
        step = lambda acc, b: (jax.tree.map(jnp.add, acc, block(*b)), None)
        return jax.lax.scan(step, first, jax.tree.map(lambda a: a[1:], blocks))[0]


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
        S, R, c = _stats_local(x, _local_arm_weights(arm, w, state.capacity), targets)
        S, R, c = (jax.lax.psum(a, BATCH) for a in (S, R, c))
        new = _apply_local(state, S, R, c, one_by_one=_on_cpu(mesh))
        return new.A, new.A_inv, new.B, new.count

    sharded = _shard_map(local, mesh, (sspec, row, row, row, row), (upd,) * 4)

    def fn(state, x, arm, targets, weight):
        TRACES["update_batch"] += 1
        n = x.shape[0]
        w = jnp.ones((n,), jnp.float32) if weight is None else weight.astype(jnp.float32)
        size = _rows_multiple(n, mesh)
        pad = lambda a: jnp.pad(a, [(0, size - n)] + [(0, 0)] * (a.ndim - 1))  # weight 0: no-ops
        A, A_inv, B, count = sharded(state, pad(x.astype(jnp.float32)), pad(arm.astype(jnp.int32)),
                                     pad(targets.astype(jnp.float32)), pad(w))
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
        new = bandit.update_batch(state, x, jnp.where(mine, arm - k0, 0), targets, jnp.where(mine, w, 0.0))
        return new.A, new.A_inv, new.B, new.count

    sharded = _shard_map(local, mesh, (sspec, rep, rep, rep, rep), (upd,) * 4)

    def fn(state, x, arm, targets, weight):
        TRACES["update_batch_woodbury"] += 1
        w = jnp.ones((x.shape[0],), jnp.float32) if weight is None else weight.astype(jnp.float32)
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
      worth it for wide batch axes and large batches (the offline fill uses it).
    Both equal the unsharded update (and the closed-form ridge) within float32 tolerance.
    """
    if method not in UPDATE_METHODS:
        raise ValueError(f"method must be one of {UPDATE_METHODS}, got {method!r}")
    fn = _update_fn(mesh) if method == "stats" else _woodbury_fn(mesh)
    return fn(shard_state(state, mesh), x, arm, targets, weight)


def update(state: RouterState, x, arm, targets, weight=None, *, mesh: Mesh, method: str = "woodbury"
           ) -> RouterState:
    """Checked, bucketed `update_batch` on the mesh (the same checks as `engine.update`)."""
    x = engine._finite_matrix("x", x, (state.dim,))
    n = x.shape[0]
    targets = engine._finite_matrix("targets", targets, (state.n_targets,))
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} rows but x has {n}")
    arm_arr = np.asarray(arm)
    if arm_arr.shape != (n,) or not np.issubdtype(arm_arr.dtype, np.integer):
        raise ValueError(f"arm must be an integer array of shape ({n},), got {arm_arr.dtype} {arm_arr.shape}")
    bad = np.flatnonzero((arm_arr < 0) | (arm_arr >= state.capacity))
    if bad.size:
        raise ValueError(f"arm must be in [0, {state.capacity}), got {arm_arr[bad[0]]} at index {bad[0]}")
    bad = np.flatnonzero(~np.asarray(state.active)[arm_arr])
    if bad.size:
        raise ValueError(f"arm {arm_arr[bad[0]]} (index {bad[0]}) is not an active arm")
    w = np.ones(n, np.float32) if weight is None else engine._batch_vector("weight", weight, n)
    size = _rows_multiple(engine.bucket(n), mesh)  # bounded set of shapes, as engine.update
    return update_batch(state, engine._pad(x, size), engine._pad(arm_arr.astype(np.int32), size),
                        engine._pad(targets, size), engine._pad(w, size), mesh=mesh, method=method)


# ---- offline fill: statistics of a whole log, then one exact apply -----------------------------

@functools.lru_cache(maxsize=None)
def _stats_fn(mesh: Mesh):
    row, rk = P(BATCH), P(BATCH, ARMS)

    def local(x, m, y):
        return tuple(jax.lax.psum(a, BATCH) for a in _stats_local(x, m, y))

    sharded = _shard_map(local, mesh, (row, rk, rk), (P(ARMS),) * 3)

    def fn(x, m, y):
        TRACES["stats"] += 1
        return sharded(x, m, y)

    return jax.jit(fn)


def stats(x, m, y, *, mesh: Mesh):
    """Per-arm statistics of a log in the wide form: x [N, d], m [N, K] weight of each (row, arm)
    observation (0: none), y [N, K, T] its targets. Returns (S [K, d, d], R [K, d, T], count [K]),
    split over the mesh's arms. Rows are padded (weight 0) to whole blocks per device.
    """
    x, m, y = np.asarray(x, np.float32), np.asarray(m, np.float32), np.asarray(y, np.float32)
    if m.shape[1] % arm_size(mesh):
        raise ValueError(f"K = {m.shape[1]} must be a multiple of the mesh's {arm_size(mesh)} arm shards")
    size = _rows_multiple(len(x), mesh)
    return _stats_fn(mesh)(*(engine._pad(a, size) for a in (x, m, y)))


@functools.lru_cache(maxsize=None)
def _apply_fn(mesh: Mesh):
    upd = P(ARMS)

    def local(state, S, R, c):
        new = _apply_local(state, S, R, c, one_by_one=_on_cpu(mesh))
        return new.A, new.A_inv, new.B, new.count

    sharded = _shard_map(local, mesh, (state_specs(), upd, upd, upd), (upd,) * 4)

    def fn(state, S, R, c):
        TRACES["apply_stats"] += 1
        A, A_inv, B, count = sharded(state, S, R, c)
        return state.replace(A=A, A_inv=A_inv, B=B, count=count)

    return jax.jit(fn)


def apply_stats(state: RouterState, S, R, count, *, mesh: Mesh) -> RouterState:
    """Add statistics to the state exactly: A += S, B += R, count += count, A_inv refreshed from A
    on the arms with observations. Statistics of disjoint logs add up: apply their sum once."""
    return _apply_fn(mesh)(shard_state(state, mesh), jnp.asarray(S, jnp.float32), jnp.asarray(R, jnp.float32),
                           jnp.asarray(count, jnp.float32))


def wide_log(registry, dataset, weight: float = 1.0, rows=None, capacity: int | None = None):
    """A logged dataset in the wide form of `stats`: (m [N, K], y [N, K, 2]) over arm slots.

    Every (query, LLM) outcome with a known quality is an observation of that LLM's slot with the
    targets (quality, log completion tokens), as `train.fill_arms`. rows: a subset of the queries.
    """
    from mixllm_jax.train import log_tokens

    q, lt = dataset.quality, log_tokens(dataset.completion_tokens)
    if rows is not None:
        q, lt = q[rows], lt[rows]
    K = capacity or registry.capacity
    slots = np.array([registry.slot(name) for name in dataset.models], np.int64)
    seen = np.isfinite(q)
    m = np.zeros((len(q), K), np.float32)
    y = np.zeros((len(q), K, 2), np.float32)
    m[:, slots] = np.where(seen, np.float32(weight), 0.0)
    y[:, slots, 0] = np.where(seen, q, 0.0)  # 0, not NaN, where unseen: 0 * NaN would poison sums
    y[:, slots, 1] = np.where(seen, lt, 0.0)
    return m, y


def fill_arms(state: RouterState, registry, x, dataset, weight: float = 1.0, *, mesh: Mesh | None = None
              ) -> RouterState:
    """`train.fill_arms` over a mesh (default: every device, data-parallel): statistics of every
    logged outcome from each device's rows, reduced, and applied once."""
    mesh = make_mesh() if mesh is None else mesh
    m, y = wide_log(registry, dataset, weight, capacity=state.capacity)
    S, R, c = stats(x, m, y, mesh=mesh)
    return apply_stats(state, S, R, c, mesh=mesh)


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
    enc._backends = encoder._backends
    return enc

"""The inputs of the serving decision, and the array helpers of the service's state.

The server decides with the library's one text -> decision computation, `router.route_text_batch`
(docs/architecture.md, "Decision"); `batch_inputs` turns a batch of RouteReq into its arguments:
per-request operating points (cost weight and mixture) in the policy, per-request cost caps (USD)
and eligibility (the request's candidate LLMs, backends and cooldowns for chat, context windows)
as policy.Constraints. The helpers below it resize and reset the state the service keeps beside the
router (load model, feedback network, slot generations) and read the checkpoint extras it saves.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mixllm_jax.core import feedback_net
from mixllm_jax.core.policy import Constraints, Policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RouteReq:
    """One prompt waiting to be routed (built on the event loop, consumed by the worker)."""

    ids: list  # token ids, truncated to the router's max_length
    prompt_tokens: int  # before truncation (what the LLM is billed for)
    point: tuple | None  # (cost_weight, mix_cost_weight, mix): the operating point; None: the router's
    max_cost_usd: float | None  # the request's cost cap in USD (0: the cheapest eligible LLM); None: none
    allowed: np.ndarray | None  # [K'] bool (slots past K' are not allowed), or None for every active arm
    book: bool  # books its predicted load (a route request over its key's cap: cleared, booking.Bookings)
    kind: str  # "route" or "chat"
    key: str  # the API key's account name (usage.key_name)
    asked_book: bool = False  # a route request that asked to book (its answer says whether it did)


def batch_inputs(reqs: list[RouteReq], B: int, K: int, policy: Policy, context_window: np.ndarray,
                 book_load: bool) -> tuple[np.ndarray, Policy, Constraints, np.ndarray]:
    """The inputs of `router.route_text_batch` for reqs padded to B rows: (prompt_tokens [B] f32,
    the policy with its operating point per row ([B] arrays; rows without their own take the
    policy's, padding rows too), Constraints (allowed [B, K], max_cost [B] USD, +inf = none;
    context_window [K]), book [B] bool: padding rows book nothing)."""
    pt = np.zeros(B, np.float32)
    cw = np.full(B, policy.cost_weight, np.float32)
    mcw = np.full(B, policy.mix_cost_weight, np.float32)
    mix = np.full(B, policy.mix, np.float32)
    max_cost = np.full(B, np.inf, np.float32)
    allowed = np.ones((B, K), bool)
    book = np.zeros(B, bool)
    for i, r in enumerate(reqs):
        pt[i] = r.prompt_tokens
        if r.point is not None:
            cw[i], mcw[i], mix[i] = r.point
        if r.max_cost_usd is not None:
            max_cost[i] = r.max_cost_usd
        if r.allowed is not None:
            allowed[i, :len(r.allowed)] = r.allowed
            allowed[i, len(r.allowed):] = False
        book[i] = r.book and book_load
    f32 = np.float32
    row_policy = policy.replace(cost_weight=cw, mix_cost_weight=mcw, mix=mix, alpha=f32(policy.alpha),
                                beta=f32(policy.beta), tau=f32(policy.tau), temperature=f32(policy.temperature),
                                epsilon=f32(policy.epsilon))
    constraints = Constraints(allowed=allowed, max_cost=max_cost, context_window=np.asarray(context_window, f32))
    return pt, row_policy, constraints, book


def reset_load(state, clock: float, share: float = 1.0):
    """Fresh load model at `clock`: every live arm's serving slots free now (free_at [K, C]), and
    only `share` of each arm's max_concurrency (at least 1) usable by this replica."""
    free = jnp.where(state.active[:, None], jnp.float32(clock), jnp.inf)
    return share_load(state.replace(clock=jnp.asarray(clock, jnp.float32),
                                    free_at=jnp.broadcast_to(free, state.free_at.shape).astype(jnp.float32)), share)


def share_load(state, share: float):
    """Close the serving slots past ceil(share * max_concurrency) (at least 1) of every arm: the
    replica books its own traffic against its share of each LLM's concurrency limit."""
    C = state.load_slots
    usable = jnp.maximum(jnp.ceil(share * state.max_concurrency.astype(jnp.float32)), 1.0)
    return state.replace(free_at=jnp.where(jnp.arange(C)[None, :] < usable[:, None], state.free_at, jnp.inf))


def fit_generation(generation: np.ndarray, K: int) -> np.ndarray:
    """generation [K'] int64 (each slot's LLM generation) padded with -1 (no LLM) to [K] when K' < K."""
    generation = np.asarray(generation, np.int64)
    if len(generation) < K:
        generation = np.concatenate([generation, np.full(K - len(generation), -1, np.int64)])
    return generation


def fit_feedback(fs, K: int):
    """Pad the feedback network's output layer (and reset its optimizer) to K arms."""
    k2 = fs.params["Dense_2"]
    have = k2["kernel"].shape[1]
    if have == K:
        return fs
    if have > K:
        raise ValueError(f"feedback network has {have} arms, more than the state's {K}")
    params = dict(fs.params)
    params["Dense_2"] = {"kernel": jnp.pad(jnp.asarray(k2["kernel"]), ((0, 0), (0, K - have))),
                         "bias": jnp.pad(jnp.asarray(k2["bias"]), (0, K - have))}
    return fs._replace(params=params, opt_state=feedback_net._optimizer().init(params))


def reset_feedback_slot(fs, slot: int):
    """A new LLM in a reused slot starts with a zero feedback term."""
    params = dict(fs.params)
    k2 = params["Dense_2"]
    params["Dense_2"] = {"kernel": k2["kernel"].at[:, slot].set(0.0), "bias": k2["bias"].at[slot].set(0.0)}
    return fs._replace(params=params)


def applied_to_array(applied: dict) -> np.ndarray:
    """{16-byte request key: feedback flags} -> uint8 [N + 1, 17] (key bytes, flags), sorted; the
    first row is zeros, so the array is never empty."""
    rows = np.zeros((len(applied) + 1, 17), np.uint8)
    for i, (k, mask) in enumerate(sorted(applied.items()), start=1):
        rows[i, :16] = np.frombuffer(k, np.uint8)
        rows[i, 16] = mask
    return rows


def applied_from_array(a: np.ndarray) -> dict:
    """The inverse of `applied_to_array` (rows with no flags skipped)."""
    a = np.asarray(a, np.uint8).reshape(-1, 17)
    return {bytes(r[:16]): int(r[16]) for r in a if r[16]}


def extras_template(meta: dict):
    """A template for a checkpoint's extras, from its metadata, and its kind: the server's
    (feedback, journal_seq, generation, applied?) -> (like, "server"), the feedback network alone ->
    (like, "feedback"), anything else -> (None, None) (ignored: a fresh feedback network).
    Checkpoints saved before the rename name the generations "arm_id" (read as they are)."""
    man = meta["arrays"].get("extras")
    if not man:
        return None, None
    tops = {k.split("/")[0] for k in man}
    gen = "arm_id" if "arm_id" in tops else "generation"
    server = {"feedback", "journal_seq", gen}
    if not tops <= server | {"applied"} or "feedback" not in tops:
        log.warning("checkpoint extras %s are not the server's; starting a fresh feedback network", sorted(tops))
        return None, None
    k0, k2 = man.get("feedback/params/Dense_0/kernel"), man.get("feedback/params/Dense_2/kernel")
    if k0 is None or k2 is None:
        return None, None
    fs = feedback_net.init_feedback(k0["shape"][0], k2["shape"][1], hidden=k0["shape"][1])
    like = {"feedback": fs}
    if tops in (server, server | {"applied"}):
        like["journal_seq"] = np.zeros((), np.int64)
        like[gen] = np.zeros(man[gen]["shape"], np.int64)
        if "applied" in tops:
            like["applied"] = np.zeros(man["applied"]["shape"], np.uint8)
        return like, "server"
    return (like, "feedback") if tops == {"feedback"} else (None, None)

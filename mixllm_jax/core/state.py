"""Router state: one pytree of stacked per-arm arrays, and a host-side name <-> slot registry.

Every per-LLM array has a leading arm axis of fixed capacity K. An LLM occupies one slot; removing
it clears `active`, adding one fills a free slot, so shapes (and compiled code) never change inside
the capacity. Past the capacity, `grow` doubles it (one recompile).

Features x have dimension d and end with a constant 1 (the bias feature, see `with_bias`): the
bias coordinate is what a prior quality is placed on.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax.numpy as jnp
import numpy as np

from mixllm_jax.core.latency import DEFAULT_MAX_CONCURRENCY, DEFAULT_TOKENS_PER_S, DEFAULT_TTFT_S

QUALITY, LOG_TOKENS = 0, 1  # target columns of B: quality, log completion tokens
ARMLESS_FIELDS = ("clock", "ridge", "shared_A", "shared_A_inv", "shared_B")  # the rest have the arm axis K
DEFAULT_TARGETS = ("quality", "log_tokens")


@flax.struct.dataclass
class RouterState:
    """All router arrays. K = arm capacity, d = feature dim, T = targets, C = load slots.

    A: [K, d, d] ridge precision matrices diag(r) + sum w x x^T (kept to refresh A_inv exactly).
    A_inv: [K, d, d] their inverses, updated by Sherman-Morrison steps.
    B: [K, d, T] sums of w * x * y for the T targets (quality, log completion tokens).
    count: [K] observations per arm.  active: [K] bool, slot holds a live LLM.
    price_in, price_out: [K] USD per token.
    ttft: [K] seconds to first token.  tokens_per_s: [K] decode speed.
    max_concurrency: [K] int, requests served at once (<= C).
    free_at: [K, C] time (s) each serving slot frees; slots past max_concurrency are +inf.
    clock: [] the current time (s) queries arrive at.
    ridge: [d] the prior precision r of each feature in a fresh arm (small on intercept features,
      so they are not shrunk towards 0; see docs/architecture.md, "Predictors").
    noise: [K] each arm's quality noise scale (s.d.); the LinUCB width is noise * sqrt(x^T A_inv x).
    shared_A, shared_A_inv: [d, d], shared_B: [d, T]: the shared online component, a ridge model
      added to every arm's prediction and learned from online feedback only (bandit.update_batch
      splits each observation's surprise between the observed arm and it, so a shift common to
      every LLM, e.g. an unseen task that is harder for all, is not charged to the one observed).
      It starts at its prior (diag(ridge), 0: it predicts 0). See docs/architecture.md, "Online learning".
    """

    A: jnp.ndarray
    A_inv: jnp.ndarray
    B: jnp.ndarray
    count: jnp.ndarray
    active: jnp.ndarray
    price_in: jnp.ndarray
    price_out: jnp.ndarray
    ttft: jnp.ndarray
    tokens_per_s: jnp.ndarray
    max_concurrency: jnp.ndarray
    free_at: jnp.ndarray
    clock: jnp.ndarray
    ridge: jnp.ndarray
    noise: jnp.ndarray
    shared_A: jnp.ndarray
    shared_A_inv: jnp.ndarray
    shared_B: jnp.ndarray

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    @property
    def dim(self) -> int:
        return self.A.shape[1]

    @property
    def n_targets(self) -> int:
        return self.B.shape[2]

    @property
    def load_slots(self) -> int:
        return self.free_at.shape[1]


def with_bias(e):
    """Append the constant bias feature: [..., d-1] -> [..., d]."""
    e = jnp.asarray(e, jnp.float32)
    return jnp.concatenate([e, jnp.ones(e.shape[:-1] + (1,), e.dtype)], axis=-1)


def init_state(capacity: int, dim: int, n_targets: int = 2, load_slots: int = 32,
               ridge: float | np.ndarray = 1.0) -> RouterState:
    """An empty state: `capacity` inactive arm slots over `dim` features (bias included).

    ridge: the prior precision of a fresh arm, one number or one per feature [dim].
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (features plus bias), got {dim}")
    if n_targets < 2:
        raise ValueError(f"n_targets must be >= 2 (quality, log_tokens), got {n_targets}")
    if load_slots < 1:
        raise ValueError(f"load_slots must be >= 1, got {load_slots}")
    r = np.broadcast_to(np.asarray(ridge, np.float32), (dim,)) if np.ndim(ridge) == 0 else np.asarray(ridge, np.float32)
    if r.shape != (dim,) or not (np.all(np.isfinite(r)) and np.all(r > 0)):
        raise ValueError(f"ridge must be a positive finite number or [{dim}] such numbers, got {ridge!r:.80}")
    zeros = jnp.zeros((capacity,), jnp.float32)
    prior = jnp.broadcast_to(jnp.diag(jnp.asarray(r)), (capacity, dim, dim))
    return RouterState(
        A=prior,
        A_inv=jnp.broadcast_to(jnp.diag(jnp.asarray(1.0 / r)), (capacity, dim, dim)),
        B=jnp.zeros((capacity, dim, n_targets), jnp.float32),
        count=zeros,
        active=jnp.zeros((capacity,), bool),
        price_in=zeros,
        price_out=zeros,
        ttft=zeros,
        tokens_per_s=jnp.ones((capacity,), jnp.float32),
        max_concurrency=jnp.zeros((capacity,), jnp.int32),
        free_at=jnp.full((capacity, load_slots), jnp.inf, jnp.float32),
        clock=jnp.zeros((), jnp.float32),
        ridge=jnp.asarray(r),
        noise=jnp.ones((capacity,), jnp.float32),
        **shared_prior(jnp.asarray(r), n_targets),
    )


def shared_prior(ridge: jnp.ndarray, n_targets: int) -> dict:
    """The shared online component at its prior precision ridge [d] (RouterState fields)."""
    return {"shared_A": jnp.diag(ridge), "shared_A_inv": jnp.diag(1.0 / ridge),
            "shared_B": jnp.zeros((ridge.shape[0], n_targets), jnp.float32)}


def _check_slot(state: RouterState, slot: int, *, want_active: bool | None) -> int:
    if not isinstance(slot, (int, np.integer)) or not 0 <= slot < state.capacity:
        raise ValueError(f"slot must be an integer in [0, {state.capacity}), got {slot!r}")
    is_active = bool(state.active[slot])
    if want_active is True and not is_active:
        raise ValueError(f"slot {slot} holds no active LLM")
    if want_active is False and is_active:
        raise ValueError(f"slot {slot} is already active")
    return int(slot)


def _check_nonneg(name: str, value, *, positive: bool = False) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {kind} finite number, got {value!r}")
    return v


def add_arm(state: RouterState, slot: int, *, price_in: float, price_out: float,
            ttft: float = DEFAULT_TTFT_S, tokens_per_s: float = DEFAULT_TOKENS_PER_S,
            max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
            prior: str | float | np.ndarray = "uninformative") -> RouterState:
    """Activate a free slot with an LLM's prices (USD/token) and latency profile.

    prior: the arm's starting belief, weighted like `ridge` pseudo-observations (noise scale: the
      mean of the active arms', 1 when none):
      "uninformative": theta = 0 (predicted quality 0, uncertainty 1/sqrt(ridge) per unit x):
          explored through the LinUCB bonus, never blindly preferred;
      "mean": theta = mean theta of the active arms (warm start);
      a float p: predicted quality p for every query (on the bias feature), log tokens as "mean";
      an array [T]: per-target values on the bias feature.
    Its predictions also hold the shared online component's (bandit.predict), as every arm's do.
    """
    slot = _check_slot(state, slot, want_active=False)
    price_in = _check_nonneg("price_in", price_in)
    price_out = _check_nonneg("price_out", price_out)
    ttft = _check_nonneg("ttft", ttft)
    tokens_per_s = _check_nonneg("tokens_per_s", tokens_per_s, positive=True)
    if not isinstance(max_concurrency, (int, np.integer)) or not 1 <= max_concurrency <= state.load_slots:
        raise ValueError(f"max_concurrency must be an integer in [1, {state.load_slots}] "
                         f"(the state's load_slots), got {max_concurrency!r}")

    d, T = state.dim, state.n_targets
    r = state.ridge
    theta_mean = _mean_theta(state)
    if isinstance(prior, str):
        if prior == "uninformative":
            theta = jnp.zeros((d, T), jnp.float32)
        elif prior == "mean":
            theta = theta_mean
        else:
            raise ValueError(f"prior must be 'uninformative', 'mean', a float or an array [T], got {prior!r}")
    else:
        p = np.asarray(prior, np.float32)
        if p.ndim == 0:
            if not np.isfinite(p):
                raise ValueError(f"prior must be finite, got {prior!r}")
            theta = theta_mean.at[:, QUALITY].set(0.0).at[d - 1, QUALITY].set(float(p))
        elif p.shape == (T,) and np.all(np.isfinite(p)):
            theta = jnp.zeros((d, T), jnp.float32).at[d - 1].set(p)
        else:
            raise ValueError(f"prior array must be finite with shape ({T},), got {p!r}")

    w = state.active.astype(jnp.float32)
    noise = jnp.where(w.sum() > 0, (w * state.noise).sum() / jnp.maximum(w.sum(), 1.0), 1.0)
    return state.replace(
        A=state.A.at[slot].set(jnp.diag(r)),
        A_inv=state.A_inv.at[slot].set(jnp.diag(1.0 / r)),
        B=state.B.at[slot].set(r[:, None] * theta),
        count=state.count.at[slot].set(0.0),
        noise=state.noise.at[slot].set(noise),
        active=state.active.at[slot].set(True),
        price_in=state.price_in.at[slot].set(price_in),
        price_out=state.price_out.at[slot].set(price_out),
        ttft=state.ttft.at[slot].set(ttft),
        tokens_per_s=state.tokens_per_s.at[slot].set(tokens_per_s),
        max_concurrency=state.max_concurrency.at[slot].set(max_concurrency),
        free_at=state.free_at.at[slot].set(
            jnp.where(jnp.arange(state.load_slots) < max_concurrency, state.clock, jnp.inf)),
    )


def _mean_theta(state: RouterState) -> jnp.ndarray:
    """Mean of the active arms' theta = A_inv @ B: [d, T] (zeros when none is active)."""
    theta = jnp.einsum("kij,kjt->kit", state.A_inv, state.B)
    w = state.active.astype(jnp.float32)
    return jnp.einsum("k,kit->it", w, theta) / jnp.maximum(w.sum(), 1.0)


def remove_arm(state: RouterState, slot: int) -> RouterState:
    """Deactivate a slot; it is never chosen again until `add_arm` reuses it."""
    slot = _check_slot(state, slot, want_active=True)
    return state.replace(active=state.active.at[slot].set(False),
                         free_at=state.free_at.at[slot].set(jnp.inf))


def set_prices(state: RouterState, slot: int, *, price_in: float, price_out: float) -> RouterState:
    """Change an active arm's prices (USD/token); cost predictions follow with no retraining."""
    slot = _check_slot(state, slot, want_active=True)
    return state.replace(
        price_in=state.price_in.at[slot].set(_check_nonneg("price_in", price_in)),
        price_out=state.price_out.at[slot].set(_check_nonneg("price_out", price_out)))


def grow(state: RouterState, capacity: int) -> RouterState:
    """Pad the arm axis to `capacity` (>= current) with inactive slots."""
    K = state.capacity
    if capacity < K:
        raise ValueError(f"capacity must be >= the current {K}, got {capacity}")
    fresh = init_state(capacity - K, state.dim, state.n_targets, state.load_slots,
                       np.asarray(state.ridge)) if capacity > K else None
    if fresh is None:
        return state
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    return state.replace(**{
        f.name: cat(getattr(state, f.name), getattr(fresh, f.name))
        for f in dataclasses.fields(state) if f.name not in ARMLESS_FIELDS})


class ArmRegistry:
    """Host-side map LLM name <-> arm slot, kept beside the state arrays."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        """Names in slot order."""
        return sorted(self.slots, key=self.slots.get)

    def slot(self, name: str) -> int:
        if name not in self.slots:
            raise ValueError(f"model {name!r} is not registered (known: {self.names})")
        return self.slots[name]

    def columns(self, models) -> np.ndarray:
        """The slot of each of `models`: [M] int32 (maps data columns to arm slots)."""
        return np.array([self.slot(m) for m in models], np.int32)

    def name(self, slot: int) -> str:
        for n, s in self.slots.items():
            if s == slot:
                return n
        raise ValueError(f"slot {slot} holds no registered model")

    def free_slot(self) -> int | None:
        used = set(self.slots.values())
        return next((s for s in range(self.capacity) if s not in used), None)

    def to_dict(self) -> dict:
        return {"capacity": self.capacity, "slots": dict(self.slots)}

    @classmethod
    def from_dict(cls, d: dict) -> "ArmRegistry":
        reg = cls(int(d["capacity"]))
        reg.slots = {str(k): int(v) for k, v in d["slots"].items()}
        return reg


def add_llm(state: RouterState, registry: ArmRegistry, name: str, **arm_kwargs
            ) -> tuple[RouterState, ArmRegistry]:
    """Register `name` in a free slot (doubling the capacity when full) and activate it.

    Returns the new state and a new registry; the inputs are left unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in registry.slots:
        raise ValueError(f"name {name!r} is already registered (slot {registry.slots[name]})")
    reg = ArmRegistry.from_dict(registry.to_dict())
    slot = reg.free_slot()
    if slot is None:
        state = grow(state, 2 * state.capacity)
        reg.capacity = state.capacity
        slot = reg.free_slot()
    state = add_arm(state, slot, **arm_kwargs)
    reg.slots[name] = slot
    return state, reg


def remove_llm(state: RouterState, registry: ArmRegistry, name: str
               ) -> tuple[RouterState, ArmRegistry]:
    """Deactivate `name` and free its slot for reuse."""
    slot = registry.slot(name)
    state = remove_arm(state, slot)
    reg = ArmRegistry.from_dict(registry.to_dict())
    del reg.slots[name]
    return state, reg

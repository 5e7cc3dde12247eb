"""The live state: the served router and everything that changes with it while serving.

One `Live` is shared by the service's components (routing.py, intake.py, live_models.py, the
journal applier, the gateway). It is read and replaced on the worker thread only (the event loop
reads it for request checks, between worker steps, as before); its arrays are immutable, so a
change is a new object assigned here, never an update in place.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(eq=False)
class Live:
    """router: the restored text.router.Router (its policy is the served one); state: the bandit's
    core.state.BanditState (with the live load model); registry: core.state.ArmRegistry (LLM name ->
    slot); fs: the feedback network's state; generation [K] int64: the LLM generation in each slot
    (the journal seq of its add_model record, 0 for the first checkpoint's LLMs, -1 for none);
    active [K] bool: host copy of state.active. The backend tables (live_models.LiveModels.refresh):
    backends: LLM name -> backends.Backend; backend_mask [K] bool: the slot's LLM has a backend;
    context_window [K] f32: tokens each slot's LLM takes (+inf: unknown); prices: LLM name -> (USD
    per prompt token, per completion token). cooldown: LLM name -> time.monotonic() until which
    chat avoids it (gateway.py; an LLM removed loses its own). failures: FailureRates, each LLM's
    recent backend failure rate (an availability signal, never a quality observation). t0: the
    load model's clock origin (state.clock is seconds since it; time.monotonic() when the service
    was made)."""

    router: Any = None
    state: Any = None
    registry: Any = None
    fs: Any = None
    generation: np.ndarray | None = None
    active: np.ndarray | None = None
    backends: dict = dataclasses.field(default_factory=dict)
    backend_mask: np.ndarray | None = None
    context_window: np.ndarray | None = None
    prices: dict = dataclasses.field(default_factory=dict)
    cooldown: dict = dataclasses.field(default_factory=dict)
    failures: "FailureRates" = dataclasses.field(default_factory=lambda: FailureRates())
    t0: float = dataclasses.field(default_factory=time.monotonic)

    def slot_live(self, slot: int, generation: int) -> bool:
        """Whether `slot` holds an active LLM of `generation` (the one a feedback record names)."""
        return (0 <= slot < self.state.capacity and bool(self.active[slot])
                and int(self.generation[slot]) == generation)


class FailureRates:
    """Each LLM's backend failure rate: failed calls / calls, both decayed exponentially with a
    half-life of `half_life_s` (so a backend that recovers is forgiven within minutes). Fed by
    proxy.Proxy for every backend call that ends (a client disconnect counts as neither), read by
    GET /v1/models ("failure_rate") and the mixllm_backend_failure_rate gauge. Event loop only
    (its readers on the worker thread read a float)."""

    def __init__(self, half_life_s: float = 300.0):
        self.half_life_s = half_life_s
        self.by_model: dict[str, tuple[float, float, float]] = {}  # model -> (calls, failures, time.monotonic())

    def observe(self, model: str, failed: bool, now: float | None = None) -> float:
        """Count one backend call of `model`; returns its failure rate after it."""
        now = time.monotonic() if now is None else now
        calls, fails, t = self.by_model.get(model, (0.0, 0.0, now))
        decay = 0.5 ** (max(now - t, 0.0) / self.half_life_s)
        calls, fails = calls * decay + 1.0, fails * decay + float(failed)
        self.by_model[model] = (calls, fails, now)
        return fails / calls

    def rate(self, model: str) -> float | None:
        """The failure rate of `model`'s backend calls (None: no call yet)."""
        v = self.by_model.get(model)
        return None if v is None else v[1] / v[0]

    def forget(self, model: str) -> None:
        self.by_model.pop(model, None)

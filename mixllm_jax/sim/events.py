"""Events of a simulated stream: a changing set of LLMs and prices (``simulate.run_router(events=...)``).

``AddLLM`` (cold start from a prior), ``RemoveLLM`` and ``SetPrice`` apply from the start of the
routing window holding their query; ``apply_event`` changes the state, the registry and the world
(arm slots are reused inside the state's capacity, so nothing recompiles).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixllm_jax.core.state import ArmRegistry, RouterState, add_llm, remove_llm, set_prices


@dataclasses.dataclass(frozen=True)
class AddLLM:
    """At query index `at`, the world's model `name` joins the router (cold start from `prior`,
    see state.add_arm: "mean", "uninformative", a float quality, or an array).

    Every event applies from the start of the routing window holding query `at` (its "row" in
    `StreamResult.info["events"]`)."""

    at: int
    name: str
    prior: str | float = "mean"


@dataclasses.dataclass(frozen=True)
class RemoveLLM:
    """At query index `at`, model `name` leaves: nothing is routed to it afterwards."""

    at: int
    name: str


@dataclasses.dataclass(frozen=True)
class SetPrice:
    """At query index `at`, model `name` changes price (USD per million tokens); the router is told."""

    at: int
    name: str
    price_in_per_mtok: float
    price_out_per_mtok: float


Event = AddLLM | RemoveLLM | SetPrice


def apply_event(ev: Event, state: RouterState, registry: ArmRegistry, world):
    """(state, registry, world) after `ev`; `world`: a simulate.World (its prices change with SetPrice)."""
    if isinstance(ev, AddLLM):
        m = world.index(ev.name)
        state, registry = add_llm(state, registry, ev.name, price_in=float(world.price_in[m]),
                                  price_out=float(world.price_out[m]), ttft=float(world.ttft[m]),
                                  tokens_per_s=float(world.tokens_per_s[m]),
                                  max_concurrency=int(world.max_concurrency[m]), prior=ev.prior)
    elif isinstance(ev, RemoveLLM):
        state, registry = remove_llm(state, registry, ev.name)
    elif isinstance(ev, SetPrice):
        m = world.index(ev.name)
        world.price_in[m], world.price_out[m] = ev.price_in_per_mtok * 1e-6, ev.price_out_per_mtok * 1e-6
        if ev.name in registry.slots:
            state = set_prices(state, registry.slot(ev.name), price_in=world.price_in[m],
                               price_out=world.price_out[m])
    else:
        raise TypeError(f"unknown event {ev!r}")
    return state, registry, world


def slot_models(registry: ArmRegistry, world, capacity: int) -> np.ndarray:
    """model column of each arm slot [K] (-1: empty)."""
    out = np.full(capacity, -1, np.int64)
    for name, slot in registry.slots.items():
        out[slot] = world.index(name)
    return out

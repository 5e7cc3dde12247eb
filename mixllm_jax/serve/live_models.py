"""Live LLMs: adding, repricing and removing an LLM while serving (POST /v1/models, PATCH and
DELETE /v1/models/{name}), validated in full, journaled, then applied (live and on replay alike),
and the model list.

A part of RouterService (service.py), which owns the state these methods read and replace; changes
are applied on its worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import math

import numpy as np

from mixllm_jax.core.latency import DEFAULT_MAX_CONCURRENCY, DEFAULT_TOKENS_PER_S, DEFAULT_TTFT_S
from mixllm_jax.serve.backends import resolve_live_backend
from mixllm_jax.serve.compute import fit_feedback, fit_generation, reset_feedback_slot, share_load
from mixllm_jax.serve.http import ApiError, is_num, model_spec
from mixllm_jax.core.state import add_llm, remove_llm, set_prices

log = logging.getLogger(__name__)

MODEL_DEFAULTS = {"ttft_s": DEFAULT_TTFT_S, "tokens_per_s": DEFAULT_TOKENS_PER_S,
                  "max_concurrency": DEFAULT_MAX_CONCURRENCY}


def _per_mtok(v):
    return v * 1e6 if is_num(v) and math.isfinite(v) else v


def _f32(v) -> float | None:
    """A float32 state value shown without float32 noise (7 significant digits); None if not finite."""
    v = float(v)
    return float(f"{v:.7g}") if math.isfinite(v) else None


def _num(v) -> float | None:
    """A float for a JSON answer: None where it is not finite (JSON has no inf or NaN)."""
    v = float(v)
    return v if math.isfinite(v) else None


class LiveModels:
    """RouterService's live-LLM methods (see the module docstring)."""

    def _apply_add(self, rec: dict) -> None:
        name = rec["name"]
        if name in self.registry.slots:
            log.warning("journal seq %d: model %r already registered; add skipped", rec["seq"], name)
            return
        spec = self._check_add_record(rec)  # the request's checks again: a record journaled before them is skipped
        state, reg = add_llm(self.state, self.registry, name, price_in=spec["price_in"], price_out=spec["price_out"],
                             ttft=spec["ttft_s"], tokens_per_s=spec["tokens_per_s"],
                             max_concurrency=spec["max_concurrency"], prior=spec["prior"])
        slot = reg.slots[name]
        if self.cfg.concurrency_share < 1:
            state = share_load(state, self.cfg.concurrency_share)
        if state.capacity != self.state.capacity:
            log.info("capacity grew from %d to %d arms (one recompile)", self.state.capacity, state.capacity)
        self.fs = reset_feedback_slot(fit_feedback(self.fs, state.capacity), slot)
        generation = fit_generation(self.generation, state.capacity).copy()
        generation[slot] = rec["seq"]
        self.state, self.registry, self.generation = state, reg, generation
        self._active = np.asarray(state.active)
        b = None
        if rec.get("backend"):
            b = resolve_live_backend(rec["backend"], self.backends_file, f"journal seq {rec['seq']}: model {name!r}")
        if b is not None:
            self.live_backends[name] = b
        else:
            self.live_backends.pop(name, None)
        self._refresh_backends()
        self._update_gauges()

    def _check_add_record(self, rec: dict) -> dict:
        """An add_model record's spec through the same checks as POST /v1/models (ValueError if not)."""
        body = {"name": rec.get("name"), "price_in_per_mtok": _per_mtok(rec.get("price_in")),
                "price_out_per_mtok": _per_mtok(rec.get("price_out")), "ttft_s": rec.get("ttft_s"),
                "tokens_per_s": rec.get("tokens_per_s"), "max_concurrency": rec.get("max_concurrency"),
                "prior": rec.get("prior")}
        try:
            spec = model_spec(body, self.state.load_slots, MODEL_DEFAULTS)
        except ApiError as e:
            raise ValueError(f"model record fails the checks of POST /v1/models: {e.message}") from None
        spec["price_in"], spec["price_out"] = float(rec["price_in"]), float(rec["price_out"])
        return spec

    def _apply_remove(self, rec: dict) -> None:
        name = rec["name"]
        if name not in self.registry.slots:
            log.warning("journal seq %d: model %r not registered; remove skipped", rec["seq"], name)
            return
        slot = self.registry.slots[name]
        self.state, self.registry = remove_llm(self.state, self.registry, name)
        generation = self.generation.copy()
        generation[slot] = -1
        self.generation = generation
        self._active = np.asarray(self.state.active)
        self.live_backends.pop(name, None)
        self.cooldown.pop(name, None)  # an LLM added later under this name starts without one
        self._refresh_backends()
        self._update_gauges()


    async def add_model(self, spec: dict) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._add_model, spec)

    def _add_model(self, spec: dict) -> dict:
        """Validate in full (a dry run of the very change, on this thread, which owns the state),
        then journal, then apply: a refused request leaves no trace."""
        self._drain()
        name = spec["name"]
        if name in self.registry.slots:
            raise ApiError(409, f"model {name!r} is already registered (slot {self.registry.slots[name]}); "
                                f"DELETE it first to replace it", param="name")
        if len(self.registry.slots) >= self.cfg.max_llms:
            raise ApiError(409, f"the router serves {len(self.registry.slots)} LLMs, the limit set by the operator "
                                f"(--max-llms); remove one first", "limit_reached")
        try:  # dry run: the state functions check prices, latency profile and prior
            state, _ = add_llm(self.state, self.registry, name, price_in=spec["price_in"],
                               price_out=spec["price_out"], ttft=spec["ttft_s"], tokens_per_s=spec["tokens_per_s"],
                               max_concurrency=spec["max_concurrency"], prior=spec["prior"])
            self._check_add_record(dict(spec, backend=None))
        except ValueError as e:
            raise ApiError(422, f"cannot add model {name!r}: {e}") from None
        for f in ("price_in", "price_out", "ttft", "tokens_per_s", "B", "noise"):
            if not bool(np.all(np.isfinite(np.asarray(getattr(state, f))))):
                raise ApiError(422, f"cannot add model {name!r}: its {f} would not be finite in float32")
        seq = self.journal.append(dict(spec, type="add_model")).result()
        self._drain()
        if name not in self.registry.slots:  # --cluster: stored, not yet delivered back (rare)
            raise ApiError(503, f"model {name!r} was recorded (event {seq}) but is not applied on this replica yet; "
                                f"it will be", "unavailable", headers={"Retry-After": "1"})
        return self.model_info(name)

    def _apply_reprice(self, rec: dict) -> None:
        name, slot = rec["name"], self.registry.slots.get(rec["name"])
        if slot is None or int(self.generation[slot]) != int(rec["generation"]):
            log.warning("journal seq %d: model %r (generation %s) is gone; reprice skipped", rec["seq"], name,
                        rec["generation"])
            return
        self.state = self._repriced(slot, float(rec["price_in"]), float(rec["price_out"]))
        self._refresh_backends()

    def _repriced(self, slot: int, price_in: float, price_out: float):
        """The state with slot's new prices (USD per token), checked finite in float32 (ValueError)."""
        if not (math.isfinite(np.float32(price_in)) and math.isfinite(np.float32(price_out))):
            raise ValueError("prices must be finite in float32")
        return set_prices(self.state, slot, price_in=price_in, price_out=price_out)

    async def reprice_model(self, name: str, price_in: float, price_out: float) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._reprice_model, name, price_in,
                                                                price_out)

    def _reprice_model(self, name: str, price_in: float, price_out: float) -> dict:
        """New prices (USD per token) for a live LLM: checked, journaled, applied; its model info."""
        self._drain()
        if name not in self.registry.slots:
            raise ApiError(404, f"model {name!r} is not registered (known: {self.registry.names})",
                           "not_found", param="name")
        slot = self.registry.slots[name]
        try:
            self._repriced(slot, price_in, price_out)  # dry run
        except ValueError as e:
            raise ApiError(422, f"cannot reprice model {name!r}: {e}") from None
        self.journal.append({"type": "reprice_model", "name": name, "generation": int(self.generation[slot]),
                             "price_in": price_in, "price_out": price_out}).result()
        self._drain()
        return self.model_info(name)

    async def remove_model(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.worker, self._remove_model, name)

    def _remove_model(self, name: str) -> None:
        self._drain()
        if name not in self.registry.slots:
            raise ApiError(404, f"model {name!r} is not registered (known: {self.registry.names})",
                           "not_found", param="name")
        if len(self.registry.slots) == 1:
            raise ApiError(409, f"model {name!r} is the last one; the router needs at least one LLM")
        self.journal.append({"type": "remove_model", "name": name}).result()
        self._drain()

    def model_info(self, name: str) -> dict:
        st, reg = self.state, self.registry
        s = reg.slots[name]
        b = self.backends.get(name)
        return {"id": name, "object": "model", "owned_by": "mixllm-jax", "slot": s,
                "price_in_per_mtok": _f32(float(st.price_in[s]) * 1e6),
                "price_out_per_mtok": _f32(float(st.price_out[s]) * 1e6),
                "ttft_s": _f32(st.ttft[s]), "tokens_per_s": _f32(st.tokens_per_s[s]),
                "max_concurrency": int(st.max_concurrency[s]), "observations": _num(st.count[s]),
                "context_window": _num(self.context_window[s]), "kind": "llm",
                "backend": None if b is None else b.public()}

    def _models(self) -> list[dict]:
        self._drain()  # read your writes: acknowledged feedback is counted
        return [self.model_info(n) for n in self.registry.names]

    async def models(self) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._models)

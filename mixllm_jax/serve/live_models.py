"""Live LLMs: adding, repricing and removing an LLM while serving (POST /v1/models, PATCH and
DELETE /v1/models/{name}), validated in full, journaled, then applied (live and on replay alike),
the model list, and the backend tables (which LLM has a backend, its context window, its prices).

The changes are applied on the worker thread, in journal order (applier.Applier). Each slot's
generation (live.Live.generation) is the journal seq of the add_model record of its LLM (0 for the
first checkpoint's LLMs, -1 for none), so feedback for a removed LLM is never applied to a newer
LLM in its slot.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import numpy as np

from mixllm_jax.core.latency import DEFAULT_MAX_CONCURRENCY, DEFAULT_TOKENS_PER_S, DEFAULT_TTFT_S
from mixllm_jax.serve.backends import (Backend, BackendsFile, load_backends_file, read_live_backends,
                                       resolve_live_backend)
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
    """The live-LLM registry (see the module docstring). live: the live state (state, registry,
    feedback network, generations and the backend tables it refreshes); journal: the journal;
    drain: the applier's (applies every journaled record, worker thread); worker: the worker
    thread's executor; metrics: prometheus.Metrics; max_llms, concurrency_share: ServeConfig's.
    The backends: `backends_file` (--backends: its backends and allow_hosts), `live_backends`
    (those of LLMs added with a backend, saved beside each checkpoint in live_models.json),
    `file_windows` (--context-windows: LLM name -> tokens)."""

    def __init__(self, live, *, journal, drain, worker, metrics, max_llms: int, concurrency_share: float):
        self.live, self.journal, self.drain, self.worker, self.metrics = live, journal, drain, worker, metrics
        self.max_llms, self.concurrency_share = max_llms, concurrency_share
        self.backends_file = BackendsFile()
        self.live_backends: dict[str, Backend] = {}
        self.file_windows: dict[str, int] = {}

    def load_files(self, backends: str | Path | None, context_windows: str | None) -> None:
        """Read --backends and --context-windows (at start, before the checkpoint is restored)."""
        self.backends_file = load_backends_file(backends)
        if context_windows is not None:
            from mixllm_jax.data import load_models

            self.file_windows = {s.name: s.context_window for s in load_models(context_windows)
                                 if s.context_window is not None}

    def restore(self, side_dir: Path) -> None:
        """The backends of LLMs added while serving, from live_models.json beside the checkpoint
        restored (after it is restored: the live tables are refreshed)."""
        self.live_backends = {}
        for n, rec in read_live_backends(side_dir / "live_models.json").items():
            b = resolve_live_backend(rec, self.backends_file, f"live_models.json: {str(n)[:80]!r}")
            if b is not None:
                self.live_backends[n] = b
        self.refresh()

    def records(self) -> dict:
        """live_models.json: the backends of LLMs added while serving."""
        return {n: b.record() for n, b in self.live_backends.items()}

    def refresh(self) -> None:
        """The host copies of what each slot's LLM has: a backend, a context window, prices."""
        live = self.live
        b = dict(self.backends_file.backends)
        b.update(self.live_backends)
        live.backends = b
        K = live.state.capacity
        mask = np.zeros(K, bool)
        window = np.full(K, np.inf, np.float32)
        pin, pout = np.asarray(live.state.price_in), np.asarray(live.state.price_out)
        prices = {}
        for name, slot in live.registry.slots.items():
            mask[slot] = name in b
            w = b[name].context_window if name in b and b[name].context_window else self.file_windows.get(name)
            window[slot] = np.inf if w is None else w
            prices[name] = (float(pin[slot]), float(pout[slot]))
        live.backend_mask, live.context_window, live.prices = mask, window, prices

    def update_gauges(self) -> None:
        self.metrics.learning.models.set(len(self.live.registry.slots))

    def apply_add(self, rec: dict) -> None:
        name = rec["name"]
        live = self.live
        if name in live.registry.slots:
            log.warning("journal seq %d: model %r already registered; add skipped", rec["seq"], name)
            return
        spec = self._check_add_record(rec)  # the request's checks again: a record journaled before them is skipped
        state, reg = add_llm(live.state, live.registry, name, price_in=spec["price_in"], price_out=spec["price_out"],
                             ttft=spec["ttft_s"], tokens_per_s=spec["tokens_per_s"],
                             max_concurrency=spec["max_concurrency"], prior=spec["prior"])
        slot = reg.slots[name]
        if self.concurrency_share < 1:
            state = share_load(state, self.concurrency_share)
        if state.capacity != live.state.capacity:
            log.info("capacity grew from %d to %d arms (one recompile)", live.state.capacity, state.capacity)
        live.fs = reset_feedback_slot(fit_feedback(live.fs, state.capacity), slot)
        generation = fit_generation(live.generation, state.capacity).copy()
        generation[slot] = rec["seq"]
        live.state, live.registry, live.generation = state, reg, generation
        live.active = np.asarray(state.active)
        b = None
        if rec.get("backend"):
            b = resolve_live_backend(rec["backend"], self.backends_file, f"journal seq {rec['seq']}: model {name!r}")
        if b is not None:
            self.live_backends[name] = b
        else:
            self.live_backends.pop(name, None)
        self.refresh()
        self.update_gauges()

    def _check_add_record(self, rec: dict) -> dict:
        """An add_model record's spec through the same checks as POST /v1/models (ValueError if not)."""
        body = {"name": rec.get("name"), "price_in_per_mtok": _per_mtok(rec.get("price_in")),
                "price_out_per_mtok": _per_mtok(rec.get("price_out")), "ttft_s": rec.get("ttft_s"),
                "tokens_per_s": rec.get("tokens_per_s"), "max_concurrency": rec.get("max_concurrency"),
                "prior": rec.get("prior")}
        try:
            spec = model_spec(body, self.live.state.load_slots, MODEL_DEFAULTS)
        except ApiError as e:
            raise ValueError(f"model record fails the checks of POST /v1/models: {e.message}") from None
        spec["price_in"], spec["price_out"] = float(rec["price_in"]), float(rec["price_out"])
        return spec

    def apply_remove(self, rec: dict) -> None:
        name = rec["name"]
        live = self.live
        if name not in live.registry.slots:
            log.warning("journal seq %d: model %r not registered; remove skipped", rec["seq"], name)
            return
        slot = live.registry.slots[name]
        live.state, live.registry = remove_llm(live.state, live.registry, name)
        generation = live.generation.copy()
        generation[slot] = -1
        live.generation = generation
        live.active = np.asarray(live.state.active)
        self.live_backends.pop(name, None)
        live.cooldown.pop(name, None)  # an LLM added later under this name starts without one
        live.failures.forget(name)  # nor its failure rate
        self.refresh()
        self.update_gauges()


    async def add_model(self, spec: dict) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._add_model, spec)

    def _add_model(self, spec: dict) -> dict:
        """Validate in full (a dry run of the very change, on this thread, which owns the state),
        then journal, then apply: a refused request leaves no trace."""
        self.drain()
        name = spec["name"]
        reg = self.live.registry
        if name in reg.slots:
            raise ApiError(409, f"model {name!r} is already registered (slot {reg.slots[name]}); "
                                f"DELETE it first to replace it", param="name")
        if len(reg.slots) >= self.max_llms:
            raise ApiError(409, f"the router serves {len(reg.slots)} LLMs, the limit set by the operator "
                                f"(--max-llms); remove one first", "limit_reached")
        try:  # dry run: the state functions check prices, latency profile and prior
            state, _ = add_llm(self.live.state, reg, name, price_in=spec["price_in"],
                               price_out=spec["price_out"], ttft=spec["ttft_s"], tokens_per_s=spec["tokens_per_s"],
                               max_concurrency=spec["max_concurrency"], prior=spec["prior"])
            self._check_add_record(dict(spec, backend=None))
        except ValueError as e:
            raise ApiError(422, f"cannot add model {name!r}: {e}") from None
        for f in ("price_in", "price_out", "ttft", "tokens_per_s", "B", "noise"):
            if not bool(np.all(np.isfinite(np.asarray(getattr(state, f))))):
                raise ApiError(422, f"cannot add model {name!r}: its {f} would not be finite in float32")
        seq = self.journal.append(dict(spec, type="add_model")).result()
        self.drain()
        if name not in self.live.registry.slots:  # --cluster: stored, not yet delivered back (rare)
            raise ApiError(503, f"model {name!r} was recorded (event {seq}) but is not applied on this replica yet; "
                                f"it will be", "unavailable", headers={"Retry-After": "1"})
        return self.model_info(name)

    def apply_reprice(self, rec: dict) -> None:
        name, slot = rec["name"], self.live.registry.slots.get(rec["name"])
        if slot is None or int(self.live.generation[slot]) != int(rec["generation"]):
            log.warning("journal seq %d: model %r (generation %s) is gone; reprice skipped", rec["seq"], name,
                        rec["generation"])
            return
        self.live.state = self._repriced(slot, float(rec["price_in"]), float(rec["price_out"]))
        self.refresh()

    def _repriced(self, slot: int, price_in: float, price_out: float):
        """The state with slot's new prices (USD per token), checked finite in float32 (ValueError)."""
        if not (math.isfinite(np.float32(price_in)) and math.isfinite(np.float32(price_out))):
            raise ValueError("prices must be finite in float32")
        return set_prices(self.live.state, slot, price_in=price_in, price_out=price_out)

    async def reprice_model(self, name: str, price_in: float, price_out: float) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._reprice_model, name, price_in,
                                                                price_out)

    def _reprice_model(self, name: str, price_in: float, price_out: float) -> dict:
        """New prices (USD per token) for a live LLM: checked, journaled, applied; its model info."""
        self.drain()
        reg = self.live.registry
        if name not in reg.slots:
            raise ApiError(404, f"model {name!r} is not registered (known: {reg.names})",
                           "not_found", param="name")
        slot = reg.slots[name]
        try:
            self._repriced(slot, price_in, price_out)  # dry run
        except ValueError as e:
            raise ApiError(422, f"cannot reprice model {name!r}: {e}") from None
        self.journal.append({"type": "reprice_model", "name": name, "generation": int(self.live.generation[slot]),
                             "price_in": price_in, "price_out": price_out}).result()
        self.drain()
        return self.model_info(name)

    async def remove_model(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.worker, self._remove_model, name)

    def _remove_model(self, name: str) -> None:
        self.drain()
        reg = self.live.registry
        if name not in reg.slots:
            raise ApiError(404, f"model {name!r} is not registered (known: {reg.names})",
                           "not_found", param="name")
        if len(reg.slots) == 1:
            raise ApiError(409, f"model {name!r} is the last one; the router needs at least one LLM")
        self.journal.append({"type": "remove_model", "name": name}).result()
        self.drain()

    def model_info(self, name: str) -> dict:
        live = self.live
        st, reg = live.state, live.registry
        s = reg.slots[name]
        b = live.backends.get(name)
        return {"id": name, "object": "model", "owned_by": "mixllm-jax", "slot": s,
                "price_in_per_mtok": _f32(float(st.price_in[s]) * 1e6),
                "price_out_per_mtok": _f32(float(st.price_out[s]) * 1e6),
                "ttft_s": _f32(st.ttft[s]), "tokens_per_s": _f32(st.tokens_per_s[s]),
                "max_concurrency": int(st.max_concurrency[s]), "observations": _num(st.count[s]),
                "context_window": _num(live.context_window[s]), "kind": "llm",
                "failure_rate": live.failures.rate(name),
                "backend": None if b is None else b.public()}

    def _models(self) -> list[dict]:
        self.drain()  # read your writes: acknowledged feedback is counted
        return [self.model_info(n) for n in self.live.registry.names]

    async def models(self) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._models)

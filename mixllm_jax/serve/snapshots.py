"""Checkpoints of the live state, and its digest.

The Orbax checkpoint records the last applied journal seq (extras["journal_seq"]), so a restart
replays exactly the records after it; beside it, the feedback network, each slot's generation and
which requests already have feedback (extras["applied"]: a hash of each request id with its
flags, see intake.py), and, in the side folder, spend.json (the ledger) and live_models.json (the
backends of LLMs added while serving). With --cluster each replica saves into its own folder under
the shared one and writes latest.json (step, seq) there: the pointer other replicas restore from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging

import numpy as np

from mixllm_jax.core.state import ArmRegistry
from mixllm_jax.store import journal
from mixllm_jax.store.checkpoint import save_router
from mixllm_jax.serve.compute import applied_to_array

log = logging.getLogger(__name__)


def rid_key(rid: str) -> bytes:
    """The 16 bytes a request id is saved as in a checkpoint (its SHA-256, cut)."""
    return hashlib.sha256(rid.encode("utf-8", "surrogatepass")).digest()[:16]


class Checkpointer:
    """Saves checkpoints (periodically, on demand and at stop). live: the live state; applier:
    applier.Applier (drained before a snapshot; its applied seq; its journal rotated and pruned after
    a save); features: journal.FeatureStore; ledger: spend.Ledger; models: live_models.LiveModels
    (live_models.json); metrics: prometheus.Metrics; worker, aux: the executors (snapshots on the
    worker thread, saves on the helper threads); cfg: ServeConfig (where, how many, how often).
    step, seq: the last checkpoint's step and journal seq; prev_seq: the one before it."""

    def __init__(self, live, *, applier, features, ledger, models, metrics, worker, aux, cfg):
        self.live, self.applier, self.features, self.ledger, self.models = live, applier, features, ledger, models
        self.metrics, self.worker, self.aux, self.cfg = metrics, worker, aux, cfg
        self.step: int | None = None
        self.seq = self.prev_seq = 0
        self.lock = asyncio.Lock()
        self.periodic: asyncio.Task | None = None

    def restored(self, step: int, seq: int) -> None:
        """The checkpoint the service started from (its step and journal seq)."""
        self.step, self.seq, self.prev_seq = step, seq, seq
        self.metrics.journal.ckpt_step.set(step)

    def _snapshot(self):
        self.applier.drain()
        live, seq = self.live, self.applier.applied_seq
        registry = ArmRegistry.from_dict(live.registry.to_dict())
        router = dataclasses.replace(live.router, state=live.state, registry=registry)
        applied = {rid_key(rid): e.applied for rid, e in self.features.items() if e.applied}
        return router, {"feedback": live.fs, "journal_seq": np.asarray(seq, np.int64),
                        "generation": np.asarray(live.generation, np.int64),
                        "applied": applied_to_array(applied)}, seq, self.ledger.to_dict()

    async def checkpoint(self, force: bool = False) -> int | None:
        """Save a checkpoint if anything was applied since the last one (or `force`); returns the step."""
        loop = asyncio.get_running_loop()
        save_dir, side_dir = self.cfg.save_path, self.cfg.side_path
        async with self.lock:
            router, extras, seq, spend = await loop.run_in_executor(self.worker, self._snapshot)
            await loop.run_in_executor(self.aux, journal.write_json_atomic, side_dir / "spend.json",
                                       spend)  # (decision counts change without journal records)
            if seq == self.seq and not force:
                return None
            await loop.run_in_executor(self.aux, journal.write_json_atomic, side_dir / "live_models.json",
                                       self.models.records())
            step = await loop.run_in_executor(self.aux, functools.partial(
                save_router, router, save_dir, keep=self.cfg.keep_checkpoints, extras=extras))
            if self.cfg.cluster.enabled:  # the pointer other replicas restore from
                await loop.run_in_executor(self.aux, journal.write_json_atomic, save_dir / "latest.json",
                                           {"step": step, "seq": seq})
            self.features.flush()
            j = self.applier.journal
            j.rotate()
            j.prune(self.prev_seq)  # one checkpoint of slack
            self.prev_seq, self.seq, self.step = self.seq, seq, step
            self.metrics.journal.ckpts.inc()
            self.metrics.journal.ckpt_step.set(step)
            log.info("checkpoint step %d saved at journal seq %d", step, seq)
            return step

    def start_periodic(self) -> None:
        self.periodic = asyncio.get_running_loop().create_task(self._loop(), name="checkpointer")

    async def stop_periodic(self) -> None:
        if self.periodic is not None:
            self.periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.periodic

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.checkpoint_every_s)
            try:
                await self.checkpoint()
            except Exception:
                log.exception("periodic checkpoint failed (the journal keeps every record; retrying later)")


class StateDigest:
    """SHA-256 of everything a request may change that matters for routing (GET /healthz?digest=1).
    live: the live state; features: journal.FeatureStore; drain: the applier's; policy_view: the
    served policy (routing.Routing's); worker: the worker thread's executor; cluster_mode: --cluster
    (the feedback flags are then the shared bucket's, not in the digest)."""

    def __init__(self, live, *, features, drain, policy_view, worker, cluster_mode: bool):
        self.live, self.features, self.drain, self.policy_view = live, features, drain, policy_view
        self.worker, self.cluster_mode = worker, cluster_mode
        self._cache = None  # (state, feedback network, digest of their arrays)

    def compute(self) -> str:
        """Worker thread: the learned and configured arrays of the live LLMs' slots (not the load
        model, which moves with the clock, nor free slots, which nothing reads), the shared layers
        of the feedback network and its live output columns, the registry, slot generations,
        backends, and which requests have feedback. The arrays are immutable (every change makes a
        new state), so their part is recomputed only when the state or the feedback network object
        is another one."""
        self.drain()
        live = self.live
        st, fs = live.state, live.fs
        active = np.flatnonzero(np.asarray(st.active))
        cached = self._cache
        if cached is None or cached[0] is not st or cached[1] is not fs:
            h = hashlib.sha256()
            for f in ("A", "A_inv", "B", "count", "price_in", "price_out", "ttft", "tokens_per_s",
                      "max_concurrency", "noise"):
                h.update(f.encode())
                h.update(np.ascontiguousarray(np.asarray(getattr(st, f))[active]).tobytes())
            for f in ("ridge", "shared_A", "shared_A_inv", "shared_B"):
                h.update(np.ascontiguousarray(np.asarray(getattr(st, f))).tobytes())
            for name, layer in sorted(fs.params.items()):
                for k, v in sorted(layer.items()):
                    v = np.asarray(v)
                    h.update(np.ascontiguousarray(v[..., active] if name == "Dense_2" else v).tobytes())
            cached = self._cache = (st, fs, h.digest())  # holds st and fs: their ids stay theirs
        h = hashlib.sha256(cached[2])
        h.update(np.asarray(live.generation, np.int64)[active].tobytes())
        flags = [] if self.cluster_mode else sorted(  # --cluster: the flags are the shared bucket's
            (rid, e.has_quality, e.has_thumbs) for rid, e in self.features.items() if e.has_quality or e.has_thumbs)
        h.update(json.dumps({"registry": live.registry.to_dict(), "policy": self.policy_view(),
                             "backends": {n: b.record() for n, b in sorted(live.backends.items())},
                             "flags": flags}, sort_keys=True).encode())
        return h.hexdigest()

    async def __call__(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.compute)

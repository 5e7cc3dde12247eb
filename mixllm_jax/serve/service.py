"""The router service: one worker thread owning the router, its live state and every change to it.

* Every JAX computation and every state change runs on the worker thread, so routing calls never
  overlap and the state needs no lock. A micro-batcher (batcher.py) feeds it batches of RouteReq;
  `router.route_text_batch` (the library's) decides a whole batch in one jitted call.
* Every state change (feedback, usage, LLM added or removed) is journaled and fsync'ed before it
  is acknowledged (journal.Journal) and applied in journal order; the Orbax checkpoint records
  the last applied sequence number (extras["journal_seq"]) so a restart replays exactly the records
  after it.
* The live load model runs on the wall clock: state.clock is seconds since the server started;
  each decision books its predicted service time (`book_load`). The load is reset on restart.
* Exactly-once feedback: a request takes one quality and one thumbs observation. Which requests
  already have one is a flag on their feature entry, set when the record is journaled, and saved
  with every checkpoint (extras["applied"]: a hash of each request id with its flags), so it
  survives journal pruning and restarts; feature entries are kept first-in first-out, so after a
  restart exactly the last `feature_cache` routed requests can take feedback, as before it.
* Every request that changes the state is checked in full before its record is journaled; a
  record that fails to apply on replay (e.g. journaled by an older version) is logged and skipped,
  never fatal, so no request can make the service fail to start.
* generation [K] int64 names the LLM generation in each slot (the journal seq of its add_model
  record, 0 for the first checkpoint's LLMs, -1 for none), so feedback for a removed LLM is never
  applied to a newer LLM in its slot (journal records written before the rename call it "arm_id").

The math is in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import time
from pathlib import Path

import httpx
import numpy as np

from mixllm_jax.serve import batcher
from mixllm_jax.core import feedback_net
from mixllm_jax.store import journal
from mixllm_jax.text import tokens
from mixllm_jax.serve.live import Live
from mixllm_jax.serve.routing import Routing
from mixllm_jax.store.checkpoint import read_metadata, restore_router, save_router
from mixllm_jax.store.journal import QUALITY_BIT, THUMBS_BIT
from mixllm_jax.serve.backends import (Backend, BackendsFile, load_backends_file, read_live_backends,
                                       resolve_live_backend)
from mixllm_jax.text.router import route_text_batch
from mixllm_jax.serve.compute import (applied_from_array, applied_to_array, extras_template, fit_feedback,
                                      fit_generation, reset_load)
from mixllm_jax.serve.options import ServeConfig
from mixllm_jax.serve.intake import FeedbackRecords
from mixllm_jax.serve.http import is_num
from mixllm_jax.serve.live_models import LiveModels
from mixllm_jax.serve.prometheus import Metrics
from mixllm_jax.serve.spend import MAX_TOKENS, Ledger, usage_view
from mixllm_jax.core.state import ArmRegistry

log = logging.getLogger(__name__)


def rid_key(rid: str) -> bytes:
    """The 16 bytes a request id is saved as in a checkpoint (its SHA-256, cut)."""
    return hashlib.sha256(rid.encode("utf-8", "surrogatepass")).digest()[:16]


class RouterService(FeedbackRecords, LiveModels):
    """Owns the router, its live state, the logs, and the worker thread. See the module docstring;
    feedback records and live LLM changes are in their own modules (the bases)."""

    # the live state's fields, until the mixins take it as a component
    router = property(lambda self: self.live.router, lambda self, v: setattr(self.live, "router", v))
    state = property(lambda self: self.live.state, lambda self, v: setattr(self.live, "state", v))
    registry = property(lambda self: self.live.registry, lambda self, v: setattr(self.live, "registry", v))
    fs = property(lambda self: self.live.fs, lambda self, v: setattr(self.live, "fs", v))
    generation = property(lambda self: self.live.generation, lambda self, v: setattr(self.live, "generation", v))
    _active = property(lambda self: self.live.active, lambda self, v: setattr(self.live, "active", v))
    backends = property(lambda self: self.live.backends, lambda self, v: setattr(self.live, "backends", v))
    backend_mask = property(lambda self: self.live.backend_mask, lambda self, v: setattr(self.live, "backend_mask", v))
    context_window = property(lambda self: self.live.context_window, lambda self, v: setattr(self.live, "context_window", v))
    prices = property(lambda self: self.live.prices, lambda self, v: setattr(self.live, "prices", v))

    def __init__(self, config: ServeConfig):
        config.check()
        self.cfg = config
        self.metrics = Metrics()
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mixllm-worker")
        self.aux = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mixllm-aux")  # tokenize, save
        self.live = Live()  # router, state, registry, feedback network, generations, backend tables
        self.routing: Routing | None = None
        self.applied_seq = 0
        self.ckpt_seq = 0
        self.prev_ckpt_seq = 0
        self.ckpt_step = None
        self.backends_file = BackendsFile()
        self.file_backends: dict[str, Backend] = {}
        self.live_backends: dict[str, Backend] = {}
        self.file_windows: dict[str, int] = {}  # --context-windows: LLM name -> tokens
        self.cooldown: dict[str, float] = {}  # LLM name -> time.monotonic() until which chat avoids it
        m = self.metrics
        self.ledger = Ledger(on_spend=lambda k, mo, usd: m.spend.labels(k, mo).inc(usd),
                             on_decision=lambda k, mo, n: m.key_decisions.labels(k, mo).inc(n))
        self._pending: collections.deque | None = None  # journaled records not yet applied
        self.journal = None
        self.features = None
        self.batcher = None
        self.http = None
        self.t0 = time.monotonic()
        self.proxy_inflight = 0
        self.started = self.ever_started = False
        self.start_error: Exception | None = None
        self.skipped_records = 0
        self._digest_cache = None  # (state, feedback network, digest of their arrays)
        self.replayed = 0
        self._ckpt_lock = None
        self._periodic = None
        self.cluster_mode = config.cluster is not None
        self.ckpt_dir = Path(config.checkpoint)  # where checkpoints are saved (--cluster: the replica's shared folder)
        self.side_dir = config.log_path  # spend.json and live_models.json beside them (--cluster: the same folder)

    # ---- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pending = collections.deque()
        self._ckpt_lock = asyncio.Lock()
        logdir = self.cfg.log_path
        logdir.mkdir(parents=True, exist_ok=True)
        restore_dir = None
        if self.cluster_mode:
            from mixllm_jax.serve.cluster import StreamJournal, newest_checkpoint

            self.ckpt_dir = self.side_dir = self.cfg.shared_path / self.cfg.replica_name
            self.side_dir.mkdir(parents=True, exist_ok=True)
            newest = newest_checkpoint(self.cfg.shared_path)
            if newest is not None:
                restore_dir, self.side_dir = (newest[0], newest[1]), newest[0]
            self.journal = await loop.run_in_executor(None, functools.partial(
                StreamJournal, self.cfg.cluster, self.cfg.stream, self._on_durable,
                decision_ttl_s=self.cfg.decision_ttl_s))
        else:
            self.journal = journal.Journal(logdir / "journal", on_durable=self._on_durable)
        self.features = journal.FeatureStore(logdir / "requests", self.cfg.feature_cache)
        self.routing = Routing(self.live, metrics=self.metrics, ledger=self.ledger, features=self.features,
                               journal=self.journal, worker=self.worker, aux=self.aux, drain=self._drain, t0=self.t0,
                               book_load=self.cfg.book_load, max_batch=self.cfg.max_batch,
                               cluster_mode=self.cluster_mode, seed=self.cfg.seed)
        self.backends_file = load_backends_file(self.cfg.backends)
        self.file_backends = self.backends_file.backends
        if self.cfg.context_windows is not None:
            from mixllm_jax.data import load_models

            self.file_windows = {s.name: s.context_window for s in load_models(self.cfg.context_windows)
                                 if s.context_window is not None}
        self.ledger.load(self.side_dir / "spend.json")
        await loop.run_in_executor(self.worker, self._load, restore_dir)
        if self.cluster_mode:  # the replay: the stream's events after the checkpoint, then apply them
            self.replayed = await loop.run_in_executor(None, self.journal.start, self.applied_seq)
            await loop.run_in_executor(self.worker, self._drain)
            self.side_dir = self.ckpt_dir
        else:
            self.journal.start(min_seq=self.applied_seq)
        self.metrics.journal_seq.set(self.journal.seq)
        self.batcher = self.routing.batcher = batcher.MicroBatcher(
            self.routing._route_batch, self.worker, self.cfg.window_ms / 1000.0, self.cfg.max_batch,
            self.cfg.queue_limit, on_batch=self.routing._on_batch)
        self.batcher.start()
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=self.cfg.max_inflight_proxy,
                                                          max_keepalive_connections=64),
                                      timeout=60.0, trust_env=False, follow_redirects=False)
        self._periodic = loop.create_task(self._checkpoint_loop(), name="checkpointer")
        self.started = self.ever_started = True
        log.info("ready: %d LLMs, checkpoint step %s, replayed %d journal records, %d request features",
                 len(self.registry.slots), self.ckpt_step, self.replayed, len(self.features))

    async def stop(self) -> None:
        """Graceful stop (SIGTERM): finish queued routing, checkpoint, close the logs."""
        if not self.started:
            return
        self.started = False
        if self._periodic is not None:
            self._periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic
        await self.batcher.stop()
        try:
            await self.checkpoint(force=False)
        except Exception:
            log.exception("final checkpoint failed; the journal still holds every acknowledged record")
        self.journal.close()
        await asyncio.get_running_loop().run_in_executor(self.worker, self._drain)
        self.features.flush(sync=True)
        self.features.close()
        await self.http.aclose()
        self.worker.shutdown(wait=True)
        self.aux.shutdown(wait=True)
        log.info("stopped at journal seq %d (checkpoint step %s)", self.journal.seq, self.ckpt_step)

    # ---- loading and replay (worker thread) ---------------------------------------------------

    def _load(self, restore_dir: tuple[Path, int] | None = None) -> None:
        """Restore the checkpoint (--checkpoint's latest step, or `restore_dir`'s (folder, step):
        the newest shared one with --cluster) and replay the local journal after it."""
        if self.cfg.compilation_cache is not None:
            from mixllm_jax.text.cache import enable_compilation_cache

            enable_compilation_cache(None if self.cfg.compilation_cache == "auto" else self.cfg.compilation_cache)
        ck, step = restore_dir if restore_dir is not None else (Path(self.cfg.checkpoint), None)
        meta = read_metadata(ck, step)
        like, extras_kind = extras_template(meta)
        router, extras = restore_router(ck, step=meta["step"], extras_like=like)
        if router.encoder is None:
            raise ValueError(f"checkpoint {ck} has no encoder: the server routes text and needs one")
        self.router = router
        self.ckpt_step = meta["step"]
        self.metrics.ckpt_step.set(self.ckpt_step)
        K, d = router.state.capacity, router.state.dim
        fs = generation = None
        seq = 0
        applied = {}
        if extras is not None and extras_kind == "server":
            fs, seq = extras["feedback"], int(extras["journal_seq"])
            generation = np.asarray(extras["generation" if "generation" in extras else "arm_id"], np.int64)
            if "applied" in extras:
                applied = applied_from_array(np.asarray(extras["applied"]))
        elif extras is not None and extras_kind == "feedback":
            fs = extras["feedback"]
        if fs is None:
            fs = feedback_net.init_feedback(d, K)
        if generation is None:
            generation = np.zeros(K, np.int64)
        self.fs = fit_feedback(fs, K)
        self.generation = fit_generation(generation, K)
        self.applied_seq = self.ckpt_seq = self.prev_ckpt_seq = seq
        self.state = reset_load(router.state, 0.0, self.cfg.concurrency_share)
        self.registry = router.registry
        live = read_live_backends(self.side_dir / "live_models.json")
        self.live_backends = {}
        for n, rec in live.items():
            b = resolve_live_backend(rec, self.backends_file, f"live_models.json: {str(n)[:80]!r}")
            if b is not None:
                self.live_backends[n] = b
        self._refresh_backends()

        router.encoder.token_ids([])  # builds the tokenizer backend now, not on the first request

        n_feat = self.features.load()
        flagged = 0
        if applied:
            for rid, e in self.features.items():
                mask = applied.get(rid_key(rid), 0)
                if mask:
                    flagged += 1
                    e.applied |= mask
                    e.has_quality = e.has_quality or bool(mask & QUALITY_BIT)
                    e.has_thumbs = e.has_thumbs or bool(mask & THUMBS_BIT)
        records = self.journal.read()
        older = [r for r in records if r["seq"] <= seq]
        newer = [r for r in records if r["seq"] > seq]
        if records and records[0]["seq"] > seq + 1:
            raise RuntimeError(f"journal starts at seq {records[0]['seq']} but checkpoint step {self.ckpt_step} "
                               f"holds records up to seq {seq}: records {seq + 1}..{records[0]['seq'] - 1} "
                               f"are missing from {self.journal.dir}")
        self._apply(older, replay_flags_only=True)
        self._apply(newer)
        self.replayed = len(newer)
        log.info("restored step %s (journal seq %d), %d request features (%d with feedback), replayed %d records",
                 self.ckpt_step, seq, n_feat, flagged, len(newer))
        if self.cfg.warmup:
            self._warmup()
        self._update_gauges()

    def _refresh_backends(self) -> None:
        """The host copies of what each slot's LLM has: a backend, a context window, prices."""
        b = dict(self.file_backends)
        b.update(self.live_backends)
        self.backends = b
        K = self.state.capacity
        mask = np.zeros(K, bool)
        window = np.full(K, np.inf, np.float32)
        pin, pout = np.asarray(self.state.price_in), np.asarray(self.state.price_out)
        prices = {}
        for name, slot in self.registry.slots.items():
            mask[slot] = name in b
            w = b[name].context_window if name in b and b[name].context_window else self.file_windows.get(name)
            window[slot] = np.inf if w is None else w
            prices[name] = (float(pin[slot]), float(pout[slot]))
        self.backend_mask, self.context_window, self.prices = mask, window, prices

    def _warmup(self) -> None:
        t = time.perf_counter()
        sizes = sorted({tokens.bucket(n, top=self.cfg.max_batch) for n in range(1, self.cfg.max_batch + 1)})
        lengths = [L for L in self.router.encoder.length_buckets if L < self.router.max_length] + [self.router.max_length]
        for B in sizes:
            for L in lengths:
                self.routing._decide(np.zeros((B, L), np.int32), np.ones((B, L), np.int32), [], commit=False)
        log.info("warm-up: compiled %d shapes in %.1f s", len(sizes) * len(lengths), time.perf_counter() - t)

    # ---- journal application (worker thread) ------------------------------------------------

    def _on_durable(self, records: list[dict]) -> None:
        """Journal writer thread: records are on disk; queue them, in order, for the worker."""
        self._pending.extend(records)
        self.metrics.journal_seq.set(records[-1]["seq"])
        with contextlib.suppress(RuntimeError):  # shutting down
            self.worker.submit(self._drain)

    def _drain(self) -> None:
        recs = []
        while True:
            try:
                recs.append(self._pending.popleft())
            except IndexError:
                break
        if recs:
            self._apply(recs)
            if self.cluster_mode and self.started:
                now = time.time()
                for r in recs:
                    if is_num(r.get("t_pub")):
                        self.metrics.event_lag.observe(max(now - r["t_pub"], 0.0))

    def _live(self, slot: int, generation: int) -> bool:
        return 0 <= slot < self.state.capacity and bool(self._active[slot]) and int(self.generation[slot]) == generation

    def _apply(self, records: list[dict], replay_flags_only: bool = False) -> None:
        """Apply journal records in seq order (live and on replay alike). A record that fails to
        apply is logged, counted and skipped: deterministic, so live and replay agree, and a
        damaged or old record can never keep the service from starting."""
        self._active = np.asarray(self.state.active)
        i = 0
        while i < len(records):
            rec = records[i]
            typ = rec.get("type")
            if typ in ("quality", "thumbs"):
                # a run of one type is one update, except quality: one record's observations are one
                # step, since bandit.split shares a batch's surprises from the state before it (live
                # drains and replay group records differently); with --cluster one message's records
                # only, so every replica updates in the same float32 steps
                j = i
                while j < len(records) and records[j].get("type") == typ and (
                        (not self.cluster_mode and typ == "thumbs") or records[j]["seq"] == rec["seq"]):
                    j += 1
                group = records[i:j]
                try:
                    self._apply_feedback(typ, group, replay_flags_only)
                except Exception:  # noqa: BLE001
                    self._skip(group, "feedback records")
                self.applied_seq = max(self.applied_seq, group[-1]["seq"])
                i = j
                continue
            try:
                if typ == "usage":
                    e = self.features.get(rec["rid"]) if self.features is not None else None
                    ct = rec.get("completion_tokens")
                    if e is not None and is_num(ct) and 0 <= ct <= MAX_TOKENS:
                        e.observed_tokens = float(ct)
                    self.ledger.apply(rec)
                elif typ == "add_model" and not replay_flags_only:
                    self._apply_add(rec)
                elif typ == "remove_model" and not replay_flags_only:
                    self._apply_remove(rec)
                elif typ == "reprice_model" and not replay_flags_only:
                    self._apply_reprice(rec)
                elif typ == "policy" and not replay_flags_only:
                    self.routing.apply_policy(rec)
                elif typ not in ("usage", "add_model", "remove_model", "reprice_model", "policy"):
                    log.warning("journal seq %s: unknown record type %r ignored", rec.get("seq"), typ)
            except Exception:  # noqa: BLE001
                self._skip([rec], f"{typ} record")
            self.applied_seq = max(self.applied_seq, rec["seq"])
            i += 1
        self.metrics.applied_seq.set(self.applied_seq)

    def _skip(self, recs: list[dict], what: str) -> None:
        log.exception("journal seq %s..%s: %s could not be applied; skipped", recs[0].get("seq"),
                      recs[-1].get("seq"), what)
        self.metrics.skipped.inc(len(recs))
        self.skipped_records += len(recs)

    def _update_gauges(self) -> None:
        self.metrics.models.set(len(self.registry.slots))

    # ---- the routing worker's API (routing.py), for the endpoints --------------------------------

    async def route(self, texts, **kw) -> list[dict]:
        return await self.routing.route(texts, **kw)

    def policy_view(self) -> dict:
        return self.routing.policy_view()

    async def set_policy(self, rec: dict) -> dict:
        return await self.routing.set_policy(rec)

    async def journal_append(self, record: dict) -> int:
        return await asyncio.wrap_future(self.journal.append(record))

    async def usage(self, key, keys) -> dict:
        """GET /v1/usage (usage.usage_view), with every journaled usage record applied."""
        def view():
            self._drain()
            return usage_view(self.ledger, key, keys)
        return await asyncio.get_running_loop().run_in_executor(self.worker, view)

    # ---- checkpoints ------------------------------------------------------------------------

    def _snapshot(self):
        self._drain()
        registry = ArmRegistry.from_dict(self.registry.to_dict())
        router = dataclasses.replace(self.router, state=self.state, registry=registry)
        applied = {rid_key(rid): e.applied for rid, e in self.features.items() if e.applied}
        return router, {"feedback": self.fs, "journal_seq": np.asarray(self.applied_seq, np.int64),
                        "generation": np.asarray(self.generation, np.int64),
                        "applied": applied_to_array(applied)}, self.applied_seq, self.ledger.to_dict()

    async def checkpoint(self, force: bool = False) -> int | None:
        """Save a checkpoint if anything was applied since the last one (or `force`); returns the step."""
        loop = asyncio.get_running_loop()
        async with self._ckpt_lock:
            router, extras, seq, spend = await loop.run_in_executor(self.worker, self._snapshot)
            await loop.run_in_executor(self.aux, journal.write_json_atomic, self.side_dir / "spend.json",
                                       spend)  # (decision counts change without journal records)
            if seq == self.ckpt_seq and not force:
                return None
            await loop.run_in_executor(self.aux, journal.write_json_atomic,
                                       self.side_dir / "live_models.json",
                                       {n: b.record() for n, b in self.live_backends.items()})
            step = await loop.run_in_executor(self.aux, functools.partial(
                save_router, router, self.ckpt_dir, keep=self.cfg.keep_checkpoints, extras=extras))
            if self.cluster_mode:  # the pointer other replicas restore from
                await loop.run_in_executor(self.aux, journal.write_json_atomic, self.ckpt_dir / "latest.json",
                                           {"step": step, "seq": seq})
            self.features.flush()
            self.journal.rotate()
            self.journal.prune(self.prev_ckpt_seq)  # one checkpoint of slack
            self.prev_ckpt_seq, self.ckpt_seq, self.ckpt_step = self.ckpt_seq, seq, step
            self.metrics.ckpts.inc()
            self.metrics.ckpt_step.set(step)
            log.info("checkpoint step %d saved at journal seq %d", step, seq)
            return step

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.checkpoint_every_s)
            try:
                await self.checkpoint()
            except Exception:
                log.exception("periodic checkpoint failed (the journal keeps every record; retrying later)")

    def _digest(self) -> str:
        """SHA-256 of everything a request may change that matters for routing: the learned and
        configured arrays of the live LLMs' slots (not the load model, which moves with the clock,
        nor free slots, which nothing reads), the shared layers of the feedback network and its
        live output columns, the registry, slot generations, backends, and which requests have feedback.
        The arrays are immutable (every change makes a new state), so their part is recomputed only
        when the state or the feedback network object is another one."""
        self._drain()
        st, fs = self.state, self.fs
        live = np.flatnonzero(np.asarray(st.active))
        cached = self._digest_cache
        if cached is None or cached[0] is not st or cached[1] is not fs:
            h = hashlib.sha256()
            for f in ("A", "A_inv", "B", "count", "price_in", "price_out", "ttft", "tokens_per_s",
                      "max_concurrency", "noise"):
                h.update(f.encode())
                h.update(np.ascontiguousarray(np.asarray(getattr(st, f))[live]).tobytes())
            for f in ("ridge", "shared_A", "shared_A_inv", "shared_B"):
                h.update(np.ascontiguousarray(np.asarray(getattr(st, f))).tobytes())
            for name, layer in sorted(fs.params.items()):
                for k, v in sorted(layer.items()):
                    v = np.asarray(v)
                    h.update(np.ascontiguousarray(v[..., live] if name == "Dense_2" else v).tobytes())
            cached = self._digest_cache = (st, fs, h.digest())  # holds st and fs: their ids stay theirs
        h = hashlib.sha256(cached[2])
        h.update(np.asarray(self.generation, np.int64)[live].tobytes())
        flags = [] if self.cluster_mode else sorted(  # --cluster: the flags are the shared bucket's
            (rid, e.has_quality, e.has_thumbs) for rid, e in self.features.items() if e.has_quality or e.has_thumbs)
        h.update(json.dumps({"registry": self.registry.to_dict(), "policy": self.policy_view(),
                             "backends": {n: b.record() for n, b in sorted(self.backends.items())},
                             "flags": flags}, sort_keys=True).encode())
        return h.hexdigest()

    async def digest(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._digest)

    def health(self) -> dict:
        fn = route_text_batch
        return {"status": "ok", "models": self.registry.names, "queue": self.batcher.pending,
                "skipped_records": self.skipped_records,
                "proxy_inflight": self.proxy_inflight,
                "journal_seq": self.journal.seq, "applied_seq": self.applied_seq,
                "checkpoint_step": self.ckpt_step, "checkpoint_seq": self.ckpt_seq,
                "replayed": self.replayed, "features": len(self.features), "capacity": self.state.capacity,
                "compiled_route_shapes": fn._cache_size() if hasattr(fn, "_cache_size") else None,
                "uptime_s": round(time.monotonic() - self.t0, 3),
                **({"cluster": {"replica": self.cfg.replica_name, "stream": self.cfg.stream,
                                "connected": self.journal.nc.is_connected, "skipped_seqs": self.journal.gaps}} if self.cluster_mode else {})}

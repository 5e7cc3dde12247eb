"""The router service: the components of the served router, wired, started and stopped.

* Every JAX computation and every state change runs on one worker thread, so routing calls never
  overlap and the live state (live.Live) needs no lock. A micro-batcher (batcher.py) feeds the
  routing worker (routing.Routing) batches of RouteReq; `router.route_text_batch` (the library's)
  decides a whole batch in one jitted call.
* Every state change (feedback, usage, LLM added, repriced or removed, policy) is checked in full,
  then journaled and fsync'ed before it is acknowledged, and applied in journal order by the
  journal's applier (applier.Applier) on the worker thread, live and on replay alike; the
  checkpoint records the last applied seq, so a restart replays exactly the records after it
  (snapshots.py). A record that fails to apply on replay is logged and skipped, never fatal, so no
  request can make the service fail to start.
* The live load model runs on the wall clock: state.clock is seconds since the service was made
  (Live.t0); a chat call books its predicted service time, a /v1/route request only when it asks,
  capped per key and expiring (booking.py). The load is reset on restart.

The components, each given what it needs (see each module): Applier (the journal and its ordered
applier), Routing (the routing worker), Intake (feedback), LiveModels (the live-LLM registry and
the backend tables), Spend (the spend ledger and usage records), Proxy and Gateway (the chat
path), Checkpointer and StateDigest (snapshots.py). The HTTP app is app.py. The math is in
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from pathlib import Path

import numpy as np

from mixllm_jax.core import feedback_net
from mixllm_jax.store import journal
from mixllm_jax.store.checkpoint import read_metadata, restore_router
from mixllm_jax.store.journal import QUALITY_BIT, THUMBS_BIT
from mixllm_jax.text import tokens
from mixllm_jax.text.router import route_text_batch
from mixllm_jax.serve import batcher
from mixllm_jax.serve.applier import Applier
from mixllm_jax.serve.booking import Bookings
from mixllm_jax.serve.compute import applied_from_array, extras_template, fit_feedback, fit_generation, reset_load
from mixllm_jax.serve.gateway import Gateway
from mixllm_jax.serve.intake import Intake
from mixllm_jax.serve.live import Live
from mixllm_jax.serve.live_models import LiveModels
from mixllm_jax.serve.options import ServeConfig
from mixllm_jax.serve.prometheus import Metrics
from mixllm_jax.serve.proxy import Proxy
from mixllm_jax.serve.routing import Routing
from mixllm_jax.serve.snapshots import Checkpointer, StateDigest, rid_key
from mixllm_jax.serve.spend import Spend

__all__ = ["RouterService", "rid_key"]

log = logging.getLogger(__name__)


class RouterService:
    """Makes the components at `start` (once the journal is open), restores the checkpoint into the
    live state, replays the journal, serves, and checkpoints at `stop`. The HTTP app (app.py) calls
    the components: routing, intake, models, spend, gateway, checkpointer, digest. phase: "new",
    "started" or "stopped"."""

    def __init__(self, config: ServeConfig):
        config.check()
        self.cfg = config
        self.metrics = Metrics()
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mixllm-worker")
        self.aux = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mixllm-aux")  # tokenize, save
        self.live = Live()
        self.applier = Applier(self.live, metrics=self.metrics, worker=self.worker,
                               cluster_mode=config.cluster.enabled)
        self.features: journal.FeatureStore | None = None
        self.routing: Routing | None = None
        self.intake: Intake | None = None
        self.models: LiveModels | None = None
        self.spend: Spend | None = None
        self.gateway: Gateway | None = None
        self.checkpointer: Checkpointer | None = None
        self.digest: StateDigest | None = None
        self.phase = "new"

    @property
    def started(self) -> bool:
        return self.phase == "started"

    @property
    def ever_started(self) -> bool:
        return self.phase != "new"

    # ---- start / stop ---------------------------------------------------------------------

    def _make_components(self) -> None:
        """The components around the open journal and feature store (see the module docstring)."""
        cfg, live, m, w = self.cfg, self.live, self.metrics, self.worker
        j, f, drain, cluster = self.applier.journal, self.features, self.applier.drain, self.applier.cluster_mode
        self.spend = Spend(live, features=f, journal=j, metrics=m, worker=w, drain=drain)
        self.intake = Intake(live, features=f, journal=j, metrics=m, cluster_mode=cluster)
        self.models = LiveModels(live, journal=j, drain=drain, worker=w, metrics=m,
                                 max_llms=cfg.limits.max_llms, concurrency_share=cfg.cluster.concurrency_share)
        self.routing = Routing(live, metrics=m.routing, ledger=self.spend.ledger, features=f, journal=j, worker=w,
                               aux=self.aux, drain=drain, t0=live.t0, max_batch=cfg.batching.max_batch,
                               cluster_mode=cluster, seed=cfg.seed,
                               bookings=Bookings(cfg.batching.book_load, cfg.batching.booking_ttl_s,
                                                 cfg.batching.max_booked_per_key))
        proxy = Proxy(features=f, spend=self.spend, metrics=m)
        self.gateway = Gateway(live, ledger=self.spend.ledger, features=f, proxy=proxy, metrics=m, worker=w,
                               fallbacks=cfg.gateway.fallbacks, cooldown_s=cfg.gateway.cooldown_s,
                               pinned_models=cfg.gateway.pinned_models, route_on=cfg.gateway.route_on)
        self.checkpointer = Checkpointer(live, applier=self.applier, features=f, ledger=self.spend.ledger,
                                         models=self.models, metrics=m, worker=w, aux=self.aux, cfg=cfg)
        self.digest = StateDigest(live, features=f, drain=drain, policy_view=self.routing.policy_view, worker=w,
                                  cluster_mode=cluster)
        self.applier.handle(feedback=self.intake.apply, usage=self.spend.apply, add_model=self.models.apply_add,
                            remove_model=self.models.apply_remove, reprice_model=self.models.apply_reprice,
                            policy=self.routing.apply_policy)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg, applier = self.cfg, self.applier
        logdir = cfg.log_path
        logdir.mkdir(parents=True, exist_ok=True)
        restore_dir, side_dir = None, cfg.side_path
        if applier.cluster_mode:
            from mixllm_jax.serve.cluster import StreamJournal, newest_checkpoint

            cfg.save_path.mkdir(parents=True, exist_ok=True)
            newest = newest_checkpoint(cfg.shared_path)
            if newest is not None:
                restore_dir, side_dir = (newest[0], newest[1]), newest[0]
            applier.journal = await loop.run_in_executor(None, functools.partial(
                StreamJournal, cfg.cluster.url, cfg.cluster.stream, applier.on_durable,
                decision_ttl_s=cfg.cluster.decision_ttl_s))
        else:
            applier.journal = journal.Journal(logdir / "journal", on_durable=applier.on_durable)
        self.features = journal.FeatureStore(logdir / "requests", cfg.limits.feature_cache)
        self._make_components()
        self.models.load_files(cfg.backends, cfg.gateway.context_windows)
        self.spend.ledger.load(side_dir / "spend.json")
        await loop.run_in_executor(self.worker, self._load, restore_dir, side_dir)
        if applier.cluster_mode:  # the replay: the stream's events after the checkpoint, then apply them
            applier.replayed = await loop.run_in_executor(None, applier.journal.start, applier.applied_seq)
            await loop.run_in_executor(self.worker, applier.drain)
        else:
            applier.journal.start(min_seq=applier.applied_seq)
        self.metrics.journal.journal_seq.set(applier.journal.seq)
        self.metrics.journal.torn_tails.set(getattr(applier.journal, "torn_tails", 0))
        self.routing.batcher = batcher.MicroBatcher(
            self.routing._route_batch, self.worker, cfg.batching.window_ms / 1000.0, cfg.batching.max_batch,
            cfg.batching.queue_limit, on_batch=self.routing._on_batch)
        self.routing.batcher.start()
        self.gateway.proxy.open(cfg.limits.max_inflight_proxy)
        self.checkpointer.start_periodic()
        self.phase = "started"
        applier.measure_lag = True
        log.info("ready: %d LLMs, checkpoint step %s, replayed %d journal records, %d request features",
                 len(self.live.registry.slots), self.checkpointer.step, applier.replayed, len(self.features))

    async def stop(self) -> None:
        """Graceful stop (SIGTERM): finish queued routing, checkpoint, close the logs."""
        if not self.started:
            return
        self.phase = "stopped"
        self.applier.measure_lag = False
        await self.checkpointer.stop_periodic()
        await self.routing.batcher.stop()
        try:
            await self.checkpointer.checkpoint(force=False)
        except Exception:
            log.exception("final checkpoint failed; the journal still holds every acknowledged record")
        self.applier.journal.close()
        await asyncio.get_running_loop().run_in_executor(self.worker, self.applier.drain)
        self.features.flush(sync=True)
        self.features.close()
        await self.gateway.proxy.close()
        self.worker.shutdown(wait=True)
        self.aux.shutdown(wait=True)
        log.info("stopped at journal seq %d (checkpoint step %s)", self.applier.journal.seq, self.checkpointer.step)

    # ---- loading and replay (worker thread) ---------------------------------------------------

    def _load(self, restore_dir: tuple[Path, int] | None, side_dir: Path) -> None:
        """Restore the checkpoint (--checkpoint's latest step, or `restore_dir`'s (folder, step):
        the newest shared one with --cluster) and replay the local journal after it."""
        cfg, live, applier = self.cfg, self.live, self.applier
        if cfg.compilation_cache is not None:
            from mixllm_jax.text.cache import enable_compilation_cache

            enable_compilation_cache(None if cfg.compilation_cache == "auto" else cfg.compilation_cache)
        ck, step = restore_dir if restore_dir is not None else (Path(cfg.checkpoint), None)
        meta = read_metadata(ck, step)
        like, extras_kind = extras_template(meta)
        router, extras = restore_router(ck, step=meta["step"], extras_like=like)
        if router.encoder is None:
            raise ValueError(f"checkpoint {ck} has no encoder: the server routes text and needs one")
        live.router = router
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
        live.fs = fit_feedback(fs, K)
        live.generation = fit_generation(generation, K)
        self.checkpointer.restored(meta["step"], seq)
        applier.applied_seq = seq
        live.state = reset_load(router.state, 0.0, cfg.cluster.concurrency_share)
        live.registry = router.registry
        self.models.restore(side_dir)

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
        records = applier.journal.read()
        older = [r for r in records if r["seq"] <= seq]
        newer = [r for r in records if r["seq"] > seq]
        if records and records[0]["seq"] > seq + 1:
            raise RuntimeError(f"journal starts at seq {records[0]['seq']} but checkpoint step {meta['step']} "
                               f"holds records up to seq {seq}: records {seq + 1}..{records[0]['seq'] - 1} "
                               f"are missing from {applier.journal.dir}")
        applier.apply(older, replay_flags_only=True)
        applier.apply(newer)
        applier.replayed = len(newer)
        log.info("restored step %s (journal seq %d), %d request features (%d with feedback), replayed %d records",
                 meta["step"], seq, n_feat, flagged, len(newer))
        if cfg.warmup:
            self._warmup()
        self.models.update_gauges()

    def _warmup(self) -> None:
        t = time.perf_counter()
        max_batch, router = self.cfg.batching.max_batch, self.live.router
        sizes = sorted({tokens.bucket(n, top=max_batch) for n in range(1, max_batch + 1)})
        lengths = [L for L in router.encoder.length_buckets if L < router.max_length] + [router.max_length]
        for B in sizes:
            for L in lengths:
                self.routing._decide(np.zeros((B, L), np.int32), np.ones((B, L), np.int32), [], commit=False)
        log.info("warm-up: compiled %d shapes in %.1f s", len(sizes) * len(lengths), time.perf_counter() - t)

    # ---- health ---------------------------------------------------------------------------------

    def health(self) -> dict:
        fn = route_text_batch
        live, applier, ck, j = self.live, self.applier, self.checkpointer, self.applier.journal
        out = {"status": "ok", "models": live.registry.names, "queue": self.routing.batcher.pending,
               "skipped_records": applier.skipped_records,
               "proxy_inflight": self.gateway.proxy.inflight,
               "journal_seq": j.seq, "applied_seq": applier.applied_seq,
               "journal_torn_tails": getattr(j, "torn_tails", 0),  # dropped at start, possibly acknowledged
               "route_bookings": len(self.routing.bookings.live),
               "checkpoint_step": ck.step, "checkpoint_seq": ck.seq,
               "replayed": applier.replayed, "features": len(self.features), "capacity": live.state.capacity,
               "compiled_route_shapes": fn._cache_size() if hasattr(fn, "_cache_size") else None,
               "uptime_s": round(time.monotonic() - live.t0, 3)}
        if applier.cluster_mode:
            out["cluster"] = {"replica": self.cfg.replica_name, "stream": self.cfg.cluster.stream,
                              "connected": j.nc.is_connected, "skipped_seqs": j.gaps,
                              "unshared_decisions": j.unshared}
        return out

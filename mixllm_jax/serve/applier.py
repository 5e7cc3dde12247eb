"""The journal's ordered applier: every state change, live and on replay, applied in journal order.

Every state change (feedback, usage, LLM added, repriced or removed, operating point) is journaled
and fsync'ed before it is acknowledged (store.journal.Journal, or cluster.StreamJournal with
--cluster); the journal's writer hands the durable records to `on_durable`, which queues them for
the worker thread, where `drain` applies them in seq order. Which component applies a record is
wired in (`handle`): feedback runs to intake.Intake, usage to spend.Spend, the rest to
live_models.LiveModels and routing.Routing.

A record that fails to apply (e.g. journaled by an older version) is logged, counted and skipped:
deterministic, so live and replay agree, and a damaged or old record can never keep the service
from starting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Callable

import numpy as np

from mixllm_jax.serve.http import is_num

log = logging.getLogger(__name__)

CHANGES = ("add_model", "remove_model", "reprice_model", "policy")  # not applied by a flags-only replay


class Applier:
    """Queues durable journal records and applies them in order on the worker thread.

    live: the live state (its host copy of `active` is refreshed before each run of records);
    metrics: prometheus.Metrics; worker: the worker thread's executor; cluster_mode: --cluster (a
    feedback run is one message's records; the event lag is measured). `journal` is set once it is
    opened (its writer calls `on_durable`); `applied_seq`: the last record applied; `replayed`: the
    records replayed at start; `skipped_records`: those that failed to apply."""

    def __init__(self, live, *, metrics, worker, cluster_mode: bool):
        self.live, self.metrics, self.worker, self.cluster_mode = live, metrics, worker, cluster_mode
        self.journal = None
        self.pending: collections.deque = collections.deque()  # journaled records not yet applied
        self.applied_seq = 0
        self.replayed = 0
        self.skipped_records = 0
        self.measure_lag = False  # with --cluster, once serving: each record's time from publish to apply
        self.on_feedback: Callable[[str, list[dict], bool], None] | None = None
        self.on_usage: Callable[[dict], None] | None = None
        self.on_change: dict[str, Callable[[dict], None]] = {}

    def handle(self, *, feedback, usage, **changes) -> None:
        """Who applies what: feedback(type, records, flags_only) for runs of quality or thumbs
        records, usage(record), and one callable per record type of CHANGES."""
        assert set(changes) == set(CHANGES), sorted(changes)
        self.on_feedback, self.on_usage, self.on_change = feedback, usage, changes

    async def append(self, record: dict) -> int:
        """Journal `record` (durable when this returns); its seq."""
        return await asyncio.wrap_future(self.journal.append(record))

    def on_durable(self, records: list[dict]) -> None:
        """Journal writer thread: records are on disk; queue them, in order, for the worker."""
        self.pending.extend(records)
        self.metrics.journal.journal_seq.set(records[-1]["seq"])
        with contextlib.suppress(RuntimeError):  # shutting down
            self.worker.submit(self.drain)

    def drain(self) -> None:
        """Worker thread: apply every queued record."""
        recs = []
        while True:
            try:
                recs.append(self.pending.popleft())
            except IndexError:
                break
        if recs:
            self.apply(recs)
            if self.cluster_mode and self.measure_lag:
                now = time.time()
                for r in recs:
                    if is_num(r.get("t_pub")):
                        self.metrics.journal.event_lag.observe(max(now - r["t_pub"], 0.0))

    def apply(self, records: list[dict], replay_flags_only: bool = False) -> None:
        """Apply journal records in seq order (live and on replay alike); see the module docstring.
        replay_flags_only: the records the checkpoint already holds (only their feedback flags and
        usage are applied)."""
        self.live.active = np.asarray(self.live.state.active)
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
                    self.on_feedback(typ, group, replay_flags_only)
                except Exception:  # noqa: BLE001
                    self._skip(group, "feedback records")
                self.applied_seq = max(self.applied_seq, group[-1]["seq"])
                i = j
                continue
            try:
                if typ == "usage":
                    self.on_usage(rec)
                elif typ in CHANGES:
                    if not replay_flags_only:
                        self.on_change[typ](rec)
                else:
                    log.warning("journal seq %s: unknown record type %r ignored", rec.get("seq"), typ)
            except Exception:  # noqa: BLE001
                self._skip([rec], f"{typ} record")
            self.applied_seq = max(self.applied_seq, rec["seq"])
            i += 1
        self.metrics.journal.applied_seq.set(self.applied_seq)

    def _skip(self, recs: list[dict], what: str) -> None:
        log.exception("journal seq %s..%s: %s could not be applied; skipped", recs[0].get("seq"),
                      recs[-1].get("seq"), what)
        self.metrics.journal.skipped.inc(len(recs))
        self.skipped_records += len(recs)

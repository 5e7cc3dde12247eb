"""Feedback on routed requests: the journal records of quality and thumbs observations, and how
the service applies them (the bandit's update for quality, the feedback network's for thumbs).

The records are applied on the worker thread, in journal order (applier.Applier hands `apply` each
run of quality or thumbs records). Exactly-once feedback: a request takes one quality and one
thumbs observation. Which requests already have one is a flag on their feature entry, set when the
record is journaled, and saved with every checkpoint (extras["applied"]: a hash of each request id
with its flags), so it survives journal pruning and restarts; feature entries are kept first-in
first-out, so after a restart exactly the last `feature_cache` routed requests can take feedback,
as before it. A record names its LLM's slot and generation (live.Live.generation), so feedback
for a removed LLM is never applied to a newer LLM in its slot.

Provenance: quality records come from POST /v1/feedback only (a key with the `feedback` role,
source "user"). Journals written before issue 24 may hold quality-0 records of backend failures
(source "backend_failure"); they are skipped when replayed (their request keeps its flag), since
a failure says nothing about an answer's quality. See docs/serving.md, "Who can influence routing".
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import jax.numpy as jnp
import numpy as np

from mixllm_jax.core import engine, feedback_net, observation
from mixllm_jax.core.padding import pad_rows
from mixllm_jax.store import journal
from mixllm_jax.text import tokens
from mixllm_jax.store.journal import QUALITY_BIT, THUMBS_BIT
from mixllm_jax.serve.http import ApiError


class Intake:
    """Feedback intake (see the module docstring). live: the live state (the bandit state and the
    feedback network it updates); features: journal.FeatureStore; journal: the journal (its
    decisions bucket and claims with --cluster); metrics: prometheus.Metrics; cluster_mode: --cluster."""

    def __init__(self, live, *, features, journal, metrics, cluster_mode: bool):
        self.live, self.features, self.journal = live, features, journal
        self.metrics, self.cluster_mode = metrics, cluster_mode

    def apply(self, typ: str, group: list[dict], replay_flags_only: bool) -> None:
        """Worker thread: apply a run of journaled "quality" or "thumbs" records (applier.Applier)."""
        bit = QUALITY_BIT if typ == "quality" else THUMBS_BIT
        for r in group:
            e = self.features.get(r["rid"]) if self.features is not None else None
            if e is not None:
                e.applied |= bit
                if typ == "quality":
                    e.has_quality = True
                else:
                    e.has_thumbs = True
        if replay_flags_only:
            return
        group = [r for r in group if r.get("source") != "backend_failure"]  # old journals: availability, not quality
        ok = []
        for r in group:  # what the live checks guarantee, checked again (a damaged record is dropped)
            try:
                x = journal.decode_x(r["x"])
                val = float(r["quality"] if typ == "quality" else r["reward"])
                gen = int(r.get("generation", r.get("arm_id")))  # "arm_id": records written before the rename
                good = (self.live.slot_live(int(r["slot"]), gen) and x.shape == (self.live.state.dim,)
                        and bool(np.all(np.abs(x) <= 1e4)) and 0.0 <= val <= 1.0)
                if typ == "quality":
                    lt, w = float(r["log_tokens"]), float(r.get("weight", 1.0))
                    good = good and 0.0 <= lt <= 20.0 and 0.0 <= w <= 1e3
            except (KeyError, TypeError, ValueError, OverflowError):
                good = False
            if good:
                ok.append((r, x))
        if len(ok) < len(group):
            self.metrics.learning.dropped.inc(len(group) - len(ok))
        if ok:
            live = [r for r, _ in ok]
            x = np.stack([x for _, x in ok])
            slots = np.array([int(r["slot"]) for r in live], np.int32)
            if typ == "quality":
                self._update_bandit(x, slots, live)
            else:
                self._update_feedback(x, slots, np.array([float(r["reward"]) for r in live], np.float32))

    def _update_bandit(self, x, slots, recs) -> None:
        targets = np.array([[float(r["quality"]), float(r["log_tokens"])] for r in recs], np.float32)
        live = self.live
        if live.state.n_targets > 2:
            targets = np.pad(targets, ((0, 0), (0, live.state.n_targets - 2)))
        weight = np.array([float(r.get("weight", 1.0)) for r in recs], np.float32)
        live.state = engine.update(live.state, x, slots, targets, weight)

    def _update_feedback(self, x, slots, reward) -> None:
        n = len(slots)
        B = tokens.bucket(n)
        valid = np.arange(B) < n
        live = self.live
        live.fs = feedback_net.update(live.fs, jnp.asarray(pad_rows(x, B)), jnp.asarray(pad_rows(slots, B)),
                                      jnp.asarray(pad_rows(reward, B)), live.state.active, jnp.asarray(valid))



    def entry_live(self, e) -> bool:
        """Whether the LLM that served feature entry `e` still holds its slot (not removed since)."""
        reg, generation = self.live.registry, self.live.generation
        return reg.slots.get(e.model) == e.slot and int(generation[e.slot]) == e.generation

    def quality_record(self, rid: str, e, quality: float, source: str,
                       completion_tokens: float | None = None) -> dict:
        """The journal record of a quality observation (checked: finite, in range)."""
        tokens = completion_tokens if completion_tokens is not None else e.observed_tokens
        lt = float(observation.log_tokens(tokens)) if tokens is not None else e.log_tokens
        if not (0.0 <= quality <= 1.0 and math.isfinite(lt)):
            raise ApiError(422, "quality must be in [0, 1]", param="quality")
        return {"type": "quality", "rid": rid, "model": e.model, "slot": e.slot, "generation": e.generation,
                "quality": float(quality), "log_tokens": lt, "source": source, "propensity": e.propensity,
                "x": journal.encode_x(e.x)}

    def thumbs_record(self, rid: str, e, up: bool) -> dict:
        return {"type": "thumbs", "rid": rid, "model": e.model, "slot": e.slot, "generation": e.generation,
                "reward": 1.0 if up else 0.0, "propensity": e.propensity, "x": journal.encode_x(e.x)}

    async def lookup(self, rid: str):
        """The feature entry of routed request `rid` (None if unknown). With --cluster, the shared
        bucket's entry (a decision of any replica, with the feedback kinds claimed cluster-wide)
        when it has one, else this replica's own."""
        if self.cluster_mode:
            e = await self.journal.get_decision(rid)
            if e is not None:
                return e
        return self.features.get(rid)

    async def record_feedback(self, rid: str, e, records: list[dict]) -> list[int]:
        """Journal a request's feedback records together (one write: all or none), flagging the
        entry first so a concurrent duplicate gets a 409 (with --cluster: claiming the kinds in the
        shared bucket by compare-and-set); the flags are cleared if the write fails."""
        kinds = [r["type"] for r in records]
        bits = (QUALITY_BIT if "quality" in kinds else 0) | (THUMBS_BIT if "thumbs" in kinds else 0)
        claimed = False
        if self.cluster_mode:
            dup = await self.journal.claim(rid, bits)
            if dup:
                kind = "quality observation" if dup & QUALITY_BIT else "thumbs up/down"
                raise ApiError(409, f"request {rid!r} already has a {kind}",
                               param="quality" if dup & QUALITY_BIT else "thumbs")
            claimed = dup == 0
        if "quality" in kinds:
            e.has_quality = True
        if "thumbs" in kinds:
            e.has_thumbs = True
        try:
            seqs = await asyncio.wrap_future(self.journal.append_many(records))
        except BaseException:
            if "quality" in kinds:
                e.has_quality = False
            if "thumbs" in kinds:
                e.has_thumbs = False
            if claimed:
                with contextlib.suppress(Exception):  # the publish failed: the claim goes back, if it can
                    await self.journal.unclaim(rid, bits)
            raise
        for r in records:
            self.metrics.learning.feedback.labels(r["type"]).inc()
        return seqs

    async def record_quality(self, rid: str, e, quality: float, source: str,
                             completion_tokens: float | None = None) -> int:
        [seq] = await self.record_feedback(rid, e, [self.quality_record(rid, e, quality, source, completion_tokens)])
        return seq

"""The routing worker: text -> decision on the worker thread, micro-batched, and the operating point.

`route` tokenizes and queues prompts on the micro-batcher (batcher.py), whose batches run
`_route_batch` on the worker thread: one call of the library's jitted `router.route_text_batch` per batch decides every
request, keeps its features for feedback (journal.FeatureStore) and counts its decision (the spend
ledger). `set_policy` moves the default operating point through the journal (PUT /v1/policy).

The component reads and replaces the live state (live.Live: router, state, feedback network,
registry, generations, backends) only on the worker thread, like every other component; it
applies journal records (`drain`) before it reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid

import jax
import numpy as np

from mixllm_jax.core import engine, observation
from mixllm_jax.core.config import Budget
from mixllm_jax.core.policy import Policy
from mixllm_jax.serve import batcher
from mixllm_jax.serve.booking import Bookings
from mixllm_jax.store import journal
from mixllm_jax.text import tokens
from mixllm_jax.serve.compute import RouteReq, batch_inputs
from mixllm_jax.text.router import route_text_batch
from mixllm_jax.serve.http import ApiError
from mixllm_jax.serve.spend import ANONYMOUS

INLINE_TOKENIZE_CHARS = 4096  # ASCII prompts up to this many characters in all are tokenized on the event loop
# (the fast path: ~0.1 ms per 1,700 characters, ~3 ms at worst, every chunk new); others on a thread

# the explanation's fields per LLM, in order: (field, key of the host arrays of `_decide`), then "eligible"
EXPLAINED = (("quality", "quality"), ("tokens", "tokens"), ("cost", "cost"), ("uncertainty", "uncertainty"),
             ("wait", "wait"), ("penalty", "penalty"), ("feedback", "fb"), ("score", "score"))
EXPLAINED_FIELDS = tuple(f for f, _ in EXPLAINED) + ("eligible",)


def _finite_rows(a: np.ndarray) -> list[list]:
    """[n, K] floats -> rows of Python floats, None where not finite (JSON has no inf or NaN)."""
    a = np.asarray(a, np.float64)
    if np.isfinite(a).all():
        return a.tolist()
    return np.where(np.isfinite(a), a, None).tolist()


class Routing:
    """Decides batches of requests on the worker thread (see the module docstring).

    live: the live state (live.Live); metrics: prometheus.RoutingMetrics; ledger: spend.Ledger
    (decision counts); features: journal.FeatureStore; journal: the journal (journal.Journal or
    cluster.StreamJournal); worker, aux: the worker thread's and the helper threads' executors;
    drain: applies every journaled record not yet applied (the applier's, worker thread); t0: the
    load model's clock origin (live.Live.t0); bookings: the load booked on request (booking.Bookings,
    whose `enabled` is --book-load); max_batch: ServeConfig's; cluster_mode: --cluster (decisions are shared through the cluster's bucket); seed:
    --seed. `batcher` is set by the wiring (service.py: a batcher.MicroBatcher over `_route_batch`);
    `apply_policy` applies a journaled policy record (the applier's handler)."""

    def __init__(self, live, *, metrics, ledger, features, journal, worker, aux, drain, t0: float,
                 bookings: Bookings, max_batch: int, cluster_mode: bool, seed: int | None = None):
        self.live = live
        self.key = jax.random.PRNGKey(secrets.randbits(31) if seed is None else seed)  # exploration draws
        self.metrics, self.ledger, self.features, self.journal = metrics, ledger, features, journal
        self.worker, self.aux, self.drain = worker, aux, drain
        self.t0, self.bookings, self.max_batch, self.cluster_mode = t0, bookings, max_batch, cluster_mode
        self.batcher: batcher.MicroBatcher | None = None

    def apply_policy(self, rec: dict) -> None:
        """Apply a journaled policy record (worker thread; the applier's)."""
        self.live.router = dataclasses.replace(self.live.router, policy=self._policy_for(rec))

    def _decide(self, ids, mask, reqs: list[RouteReq], commit: bool = True):
        """`router.route_text_batch` on ids, mask [B, L] (reqs fill the first rows) with the
        router's policy (its exploration and the service's PRNG key included), the requests'
        operating points and constraints and the feedback network's score term -> host arrays:
        arm, domain, propensity [B]; quality, tokens, cost, uncertainty, wait, penalty, score, fb,
        eligible [B, K]; x [B, d]."""
        n = len(reqs)
        live = self.live
        router = live.router
        now = np.float32(time.monotonic() - self.t0)
        bookings = self.bookings
        if commit:  # route bookings: expired ones taken off the load, keys at their cap book nothing
            freed = bookings.expire(live.state.free_at, float(now), live.generation)
            if freed is not None:
                live.state = live.state.replace(free_at=freed)
            bookings.admit(reqs)
        pt, policy, constraints, book = batch_inputs(reqs, ids.shape[0], live.state.capacity, router.policy,
                                                     live.context_window, bookings.enabled)
        key = None
        if policy.stochastic:  # a fresh key per stochastic batch (--seed fixes the sequence)
            self.key, key = jax.random.split(self.key)
        state = live.state.replace(clock=now)
        (head_params, centroids), static = router.head_args()
        d, domain, x = route_text_batch(router.encoder.params, head_params, centroids, state, ids, mask, pt, policy,
                                        book, key, constraints, live.fs.params, enc_config=router.encoder.config,
                                        **static)
        if commit and n and book.any() and policy.in_batch_load:
            arms, toks = jax.device_get((d.arm, d.tokens))
            bookings.record(reqs, book, arms, toks, state, np.asarray(state.free_at), float(now), live.generation)
            live.state = state.replace(free_at=d.free_at)
        return jax.device_get({"arm": d.arm, "quality": d.quality, "tokens": d.tokens, "cost": d.cost,
                               "uncertainty": d.uncertainty, "wait": d.wait, "penalty": d.penalty,
                               "score": d.score, "domain": domain, "x": x, "fb": d.bonus, "eligible": d.eligible,
                               "propensity": d.propensity})

    def _route_batch(self, reqs: list[RouteReq]) -> list:
        """The batcher's call: a route result (or a 503 ApiError) per request; features kept for feedback."""
        self.drain()
        n = len(reqs)
        enc = self.live.router.encoder
        ids, mask, _ = tokens.batch([r.ids for r in reqs], self.live.router.max_length, enc.pad_id, enc.length_buckets,
                                    top=self.max_batch)
        h = self._decide(ids, mask, reqs)
        names = {s: nm for nm, s in self.live.registry.slots.items()}
        slots = sorted(names)
        llms = [names[s] for s in slots]
        tags = self.live.router.head.tags if self.live.router.head is not None else None
        # the explanation's numbers for every row at once: [n, K'] Python lists (non-finite -> None)
        cols = {f: _finite_rows(h[k][:n, slots]) for f, k in EXPLAINED}
        eligible = h["eligible"][:n, slots].tolist()
        arms, props = h["arm"][:n].tolist(), h["propensity"][:n].tolist()
        chosen = h["tokens"][np.arange(n), np.clip(h["arm"][:n], 0, None)].astype(np.float64)
        log_tokens = observation.log_tokens(chosen).tolist()
        domains = h["domain"][:n].tolist() if tags is not None and h["domain"] is not None else None
        x = np.asarray(h["x"], np.float32)
        results, entries = [], []
        for i, r in enumerate(reqs):
            arm = arms[i]
            if arm not in names or not h["eligible"][i, arm]:
                results.append(self._no_eligible(r, h["tokens"][i]))
                continue
            model = names[arm]
            rid = "req-" + uuid.uuid4().hex
            row = [cols[f][i] for f, _ in EXPLAINED]
            expl = {m: dict(zip(EXPLAINED_FIELDS, vals)) for m, *vals in zip(llms, *row, eligible[i])}
            res = {"request_id": rid, "model": model, "domain": None if domains is None else tags[domains[i]],
                   "explanation": expl}
            if r.kind == "chat":
                res["_backend"], res["_key"] = self.live.backends.get(model), r.key
            elif r.asked_book:
                res["booked"] = bool(r.book and self.bookings.enabled)
            results.append(res)
            entries.append((rid, journal.Entry(
                x=x[i], slot=arm, generation=int(self.live.generation[arm]), model=model,
                prompt_tokens=float(r.prompt_tokens), log_tokens=log_tokens[i], propensity=props[i])))
            self.metrics.decisions.labels(model).inc()
            self.ledger.decision(r.key, model)
        self.features.put_many(entries)
        if self.cluster_mode:  # route() waits for the shared copies, so feedback may go to any replica
            shared = self.journal.put_decisions(entries)
            if shared is not None:
                for res in results:
                    if isinstance(res, dict):
                        res["_shared"] = shared
        return results

    def _no_eligible(self, r: RouteReq, tokens: np.ndarray) -> ApiError:
        """Why a request found no eligible LLM: every candidate's context window is too small (400),
        or its candidates were removed meanwhile (503)."""
        cand = np.asarray(self.live.state.active).copy()
        if r.allowed is not None:
            cand[len(r.allowed):] = False
            cand[:len(r.allowed)] &= r.allowed
        if cand.any():
            need = int(r.prompt_tokens + np.min(np.asarray(tokens)[cand]))
            return ApiError(400, f"the prompt ({r.prompt_tokens} tokens) and its predicted answer (about {need} tokens "
                                 f"in all) fit no candidate LLM's context window", "context_length_exceeded",
                            code="context_length_exceeded")
        return ApiError(503, "no eligible LLM for this request (the LLMs it may use were removed); retry",
                        "no_backend", headers={"Retry-After": "1"})

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch.observe(n)
        self.metrics.batch_s.observe(seconds)

    # ---- async API used by the endpoints ------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[tuple[list, int]]:
        """Each text's (ids truncated to the router's max_length, token count before truncation)."""
        r = self.live.router
        full = r.encoder.token_ids(texts)
        return [(tokens.truncate(f, r.max_length, r.truncation_side), len(f)) for f in full]

    async def route(self, texts: list[str], *, point=None, max_cost_usd=None, allowed=None, book=None,
                    kind="route", key=ANONYMOUS) -> list[dict]:
        """Route `texts` through the micro-batcher: one result per text; 429 when the queue is full.
        point: (cost_weight, mix_cost_weight, mix) or None (the router's); max_cost_usd: the cost cap
        or None; allowed [K] bool or None; key: the API key's name (usage.py); book: book the
        predicted load (default: a chat call books, a route request only when it asks; booking.py)."""
        book = (kind == "chat") if book is None else bool(book)
        b = self.batcher
        if b.pending + len(texts) > b.queue_limit:  # refuse before tokenizing
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"request queue is full ({b.pending} of {b.queue_limit} prompts waiting); "
                                f"retry later", "overloaded", headers={"Retry-After": str(int(b.retry_after()))})
        with b.expect(len(texts)):  # a batch being collected waits for these prompts
            if (self.live.router.encoder.fast_ascii and sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS
                    and all(map(str.isascii, texts))):
                toks = self.tokenize(texts)  # the fast path (tokens.FastWordPiece): no thread hop
            else:
                toks = await asyncio.get_running_loop().run_in_executor(self.aux, self.tokenize, texts)
        reqs = [RouteReq(ids, pt, point, max_cost_usd, allowed, book, kind, key, asked_book=book and kind == "route")
                for ids, pt in toks]
        try:
            self.metrics.queue.set(b.pending + len(reqs))
            out = await b.submit(reqs)
            shared = {id(f): f for f in (r.pop("_shared", None) for r in out if isinstance(r, dict)) if f is not None}
            for f in shared.values():
                await asyncio.wrap_future(f)
            return out
        except batcher.Overloaded as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, str(e), "overloaded", headers={"Retry-After": str(int(e.retry_after))}) from None
        finally:
            self.metrics.queue.set(b.pending)

    # ---- the operating point (PUT /v1/policy) -----------------------------------------------

    def _policy_for(self, rec: dict) -> Policy:
        """The policy a journaled "policy" record sets (ValueError if out of reach or out of range):
        the router's moved to the record's budget ({"kind", "value", "reference"}: a config.Budget,
        optional) with the record's other fields ("set": POLICY_FIELDS) replaced."""
        router = self.live.router
        policy = router.policy
        if "kind" in rec:
            policy = router.policy_for(Budget(str(rec["kind"]), rec["value"], rec.get("reference")), policy)
        return engine.check_policy(policy.replace(**rec.get("set", {})))

    def policy_view(self) -> dict:
        """Exactly the policy every request is routed with (its per-request operating points aside)."""
        p = self.live.router.policy
        return {**{f: float(getattr(p, f)) for f in engine.POLICY_RANGES}, "explore": p.explore,
                "in_batch_load": bool(p.in_batch_load)}

    async def set_policy(self, rec: dict) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._set_policy, rec)

    def _set_policy(self, rec: dict) -> dict:
        """Change the policy (PUT /v1/policy): a budget ({"kind", "value", "reference"}) and/or
        fields ({"set": {field: value}}): checked, journaled, applied on every replica; the new policy."""
        self.drain()
        try:
            self._policy_for(rec)  # dry run
        except (ValueError, KeyError, TypeError) as e:
            raise ApiError(422, f"cannot change the policy: {e}") from None
        self.journal.append(dict(rec, type="policy")).result()
        self.drain()
        return self.policy_view()

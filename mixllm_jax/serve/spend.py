"""Spend and decisions per API key and per LLM, and the key budgets they are checked against.

* Spend: each proxied chat call costs its backend's reported usage at the LLM's prices (prompt
  tokens x price_in + completion tokens x price_out), else the router's predicted cost. The cost
  is computed once, on the event loop, and journaled in the call's "usage" record (with the key
  and the time), so the `Ledger` is rebuilt exactly by replaying records: it applies each usage
  record once (records up to `Ledger.seq` are already in it).
* Persistence: the ledger is written to ``<log dir>/spend.json`` at every checkpoint (before the
  Orbax save) and read at start; the journal records after its `seq` are replayed on top. Spend
  therefore survives any restart, kill -9 included. Decision counts are not journaled: they are
  saved with each checkpoint only (a crash loses those since the last one).
* Budgets (auth.KeyBudget): a request's cost cap is the smallest of its own ``max_cost_usd``, the
  key's per-request cap and what is left of the key's day (UTC) and month budgets after the calls
  in flight (their reservations) and the settled calls not yet in the ledger; once a period's
  budget is spent the router picks the cheapest eligible LLM (cap 0), or answers 429 when the key
  says ``when_exhausted: reject``.
* Reserved, then settled: before a proxied call, its predicted maximum cost (`max_call_cost`:
  prompt tokens x price_in + the request's ``max_tokens``, else `RESERVE_FACTOR` x the predicted
  completion, x price_out) is reserved against the key's budget (`Spend.reserve`, on the event
  loop: the check and the reservation are one step, so concurrent calls never see the same
  remaining budget). A call whose reservation the budget cannot cover is treated as an exhausted
  budget. The call settles by journaling its usage record (its actual cost counts as reserved
  until the ledger applies it) and releasing the reservation; every other exit (errors,
  fallbacks, a client that disconnects, a stream never started) releases it. Reservations are in
  memory only. A key's overshoot is therefore bounded by the calls whose actual cost exceeded
  their reservation (a backend that ignores ``max_tokens``, a longer completion than the bound),
  each by that difference.
* Streams: a stream that ends early (the client disconnects, or the backend fails mid-stream) is
  billed for what was streamed: the prompt at price_in plus the content deltas relayed (one token
  each) at price_out; its usage record says ``"aborted": "client" | "backend"`` and
  ``"tokens_approximate": true``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import math
import time
from pathlib import Path

from mixllm_jax.core.observation import MAX_TOKENS
from mixllm_jax.serve.auth import ApiKey
from mixllm_jax.serve.http import ApiError, is_num

log = logging.getLogger(__name__)

RESERVE_FACTOR = 4.0  # without max_tokens, a call reserves 4 x its predicted completion (a high quantile)

ANONYMOUS = "-"  # the account of requests without a key (a server without --api-keys)


def key_name(key: ApiKey | None) -> str:
    return ANONYMOUS if key is None else key.name


def _day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


@dataclasses.dataclass
class Account:
    """One key's spend (USD) in total, by LLM, in its latest UTC day and month; decisions by LLM."""

    spend_usd: float = 0.0
    calls: int = 0
    by_model: dict = dataclasses.field(default_factory=dict)  # model -> USD
    decisions: dict = dataclasses.field(default_factory=dict)  # model -> count
    day: str = ""  # YYYY-MM-DD of day_usd
    day_usd: float = 0.0
    month_usd: float = 0.0  # of the month of `day`

    def spent(self, now: float) -> tuple[float, float]:
        """(USD spent today, this month) at time `now` (UTC)."""
        today = _day(now)
        return (self.day_usd if self.day == today else 0.0,
                self.month_usd if self.day[:7] == today[:7] else 0.0)


class Ledger:
    """Accounts by key name; `seq`: the last journal record applied. `on_spend(key, model, usd)`
    and `on_decision(key, model)` feed the Prometheus counters."""

    def __init__(self, on_spend=None, on_decision=None):
        self.accounts: dict[str, Account] = {}
        self.seq = 0
        self.on_spend, self.on_decision = on_spend, on_decision

    def account(self, key: str) -> Account:
        return self.accounts.setdefault(key, Account())

    def decision(self, key: str, model: str) -> None:
        a = self.account(key)
        a.decisions[model] = a.decisions.get(model, 0) + 1
        if self.on_decision:
            self.on_decision(key, model, 1)

    def apply(self, rec: dict) -> None:
        """A journaled usage record (once: records up to `seq` are skipped); records without a cost
        (written before spend was journaled) count nothing."""
        if rec["seq"] <= self.seq:
            return
        self.seq = rec["seq"]
        usd, t, key, model = rec.get("cost_usd"), rec.get("t"), rec.get("key"), rec.get("model")
        if not (is_num(usd) and 0 <= usd < 1e9 and is_num(t) and isinstance(key, str) and isinstance(model, str)):
            return
        a = self.account(key)
        day = _day(t)
        if day > a.day:
            a.month_usd = a.month_usd if day[:7] == a.day[:7] else 0.0
            a.day, a.day_usd = day, 0.0
        if day == a.day:
            a.day_usd += usd
        if day[:7] == a.day[:7]:
            a.month_usd += usd
        a.spend_usd += usd
        a.calls += 1
        a.by_model[model] = a.by_model.get(model, 0.0) + usd
        if self.on_spend:
            self.on_spend(key, model, usd)

    def to_dict(self) -> dict:
        return {"seq": self.seq, "accounts": {k: dataclasses.asdict(a) for k, a in self.accounts.items()}}

    def load(self, path: Path) -> None:
        """Restore from spend.json (nothing when absent); the counters are set to the totals."""
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            self.seq = int(doc["seq"])
            self.accounts = {str(k): Account(**v) for k, v in doc["accounts"].items()}
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__}); fix or delete it (spend is then "
                             f"rebuilt from the journal records still kept)") from None
        for k, a in self.accounts.items():
            for m, usd in a.by_model.items():
                if self.on_spend:
                    self.on_spend(k, m, usd)
            for m, n in a.decisions.items():
                if self.on_decision:
                    self.on_decision(k, m, n)

    def view(self, key: str, budget, now: float) -> dict:
        """What GET /v1/usage shows of one key."""
        a = self.accounts.get(key, Account())
        today, month = a.spent(now)
        out = {"key": key, "spend_usd": a.spend_usd, "calls": a.calls, "today_usd": today, "month_usd": month,
               "spend_by_model": dict(a.by_model), "decisions": dict(a.decisions), "budget": None}
        if budget is not None:
            out["budget"] = dict(dataclasses.asdict(budget), remaining_usd=_finite(remaining(a, budget, now)))
        return out


def usage_view(ledger: Ledger, key: ApiKey | None, keys: dict | None, now: float | None = None) -> dict:
    """GET /v1/usage: the caller's key, or every key for admin (and on a server without keys)."""
    now = time.time() if now is None else now
    budgets = {k.name: k.budget for k in (keys or {}).values()}
    if key is None or "admin" in key.roles:
        names = sorted(set(ledger.accounts) | set(budgets))
    else:
        names = [key.name]
    return {"object": "usage", "data": [ledger.view(n, budgets.get(n), now) for n in names]}


def remaining(a: Account, budget, now: float) -> float:
    """USD left of the key's day and month budgets (inf: no limit)."""
    today, month = a.spent(now)
    left = math.inf
    if budget.usd_per_day is not None:
        left = min(left, budget.usd_per_day - today)
    if budget.usd_per_month is not None:
        left = min(left, budget.usd_per_month - month)
    return left


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def exhausted(key: ApiKey, detail: str = "") -> ApiError:
    return ApiError(429, f"the budget of API key {key.name!r} is spent for this period{detail} (see GET /v1/usage)",
                    "budget_exhausted", code="budget_exhausted")


def cost_cap(ledger: Ledger, key: ApiKey | None, requested: float | None, now: float | None = None,
             held: float = 0.0) -> float | None:
    """The request's cost cap in USD (None: none; 0: the cheapest eligible LLM) under its key's
    budget, less `held` (USD reserved by its calls in flight); ApiError 429 when the budget is
    spent and the key says "reject"."""
    budget = None if key is None else key.budget
    if budget is None:
        return requested
    caps = [c for c in (requested, budget.max_cost_usd) if c is not None]
    a = ledger.accounts.get(key.name, Account())
    left = remaining(a, budget, time.time() if now is None else now) - held
    if left <= 0:
        if budget.when_exhausted == "reject":
            raise exhausted(key, f" (USD {held:.6g} of it reserved by calls in flight)" if held > 0 else "")
        return 0.0
    if math.isfinite(left):
        caps.append(left)
    return min(caps) if caps else None


class Spend:
    """The spend ledger of the service: the `Ledger` (its Prometheus counters fed), the usage
    records of proxied calls, and GET /v1/usage. live: the live state (the LLMs' prices);
    features: journal.FeatureStore; journal: the journal; metrics: prometheus.Metrics; worker: the
    worker thread's executor; drain: the applier's (applies every journaled record, worker thread)."""

    def __init__(self, live, *, features, journal, metrics, worker, drain):
        self.live, self.features, self.journal, self.metrics = live, features, journal, metrics
        self.worker, self.drain = worker, drain
        m = metrics
        self.ledger = Ledger(on_spend=lambda k, mo, usd: m.backends.spend.labels(k, mo).inc(usd),
                             on_decision=lambda k, mo, n: m.backends.key_decisions.labels(k, mo).inc(n))
        self.holds: dict[int, Hold] = {}  # open reservations (in memory only)
        self.unsettled: dict[str, tuple[str, float]] = {}  # request id -> (key, USD): journaled, not yet in the ledger
        self._next_hold = 0

    def held(self, key: str) -> float:
        """USD of `key`'s open reservations and of its settled calls the ledger has not applied yet."""
        return (sum(h.usd for h in list(self.holds.values()) if h.key == key)
                + sum(usd for k, usd in list(self.unsettled.values()) if k == key))

    def reserve(self, key: ApiKey | None, rid: str, model: str, body: dict, prompt_scale: float = 1.0,
                force: bool = False, hold: "Hold | None" = None) -> "Hold | None":
        """Event loop: reserve the predicted maximum cost of calling `model` for routed request `rid`
        (max_call_cost) against `key`'s budget; with `hold`, move that open reservation to this call
        instead. None when the budget left (less what is held) cannot cover it, ApiError 429 then if
        the key says "reject"; `force`: reserve anyway unless it says "reject" (the cheapest LLM of an
        exhausted budget)."""
        usd = self.max_call_cost(rid, model, body, prompt_scale)
        name = key_name(key)
        budget = None if key is None else key.budget
        if budget is not None:
            held = self.held(name) - (hold.usd if hold is not None and hold.id in self.holds else 0.0)
            left = remaining(self.ledger.accounts.get(name, Account()), budget, time.time()) - held
            if usd > left:
                if budget.when_exhausted == "reject":
                    raise exhausted(key, f": USD {max(left, 0.0):.6g} left after USD {held:.6g} reserved by calls "
                                         f"in flight, less than this call's reservation of USD {usd:.6g} "
                                         f"(max_tokens lowers it)")
                if not force:
                    return None
        if hold is None:
            self._next_hold += 1
            hold = Hold(self._next_hold, name)
        hold.usd = usd
        self.holds[hold.id] = hold
        return hold

    def release(self, hold: "Hold | None") -> None:
        """End a reservation (any thread; once is enough, twice is harmless)."""
        if hold is not None:
            self.holds.pop(hold.id, None)

    def max_call_cost(self, rid: str, model: str, body: dict, prompt_scale: float = 1.0) -> float:
        """The predicted maximum cost of a call: its prompt tokens (the routed text's, x `prompt_scale`
        for a conversation longer than the text routed on) at price_in, plus its completion bound at
        price_out: the request's max_completion_tokens / max_tokens when a positive integer, else
        RESERVE_FACTOR x the predicted completion (0 without a feature entry or a price)."""
        e, price = self.features.get(rid), self.live.prices.get(model)
        if e is None or price is None:
            return 0.0
        bound = None
        for f in ("max_completion_tokens", "max_tokens"):
            v = body.get(f)
            if is_num(v) and 1 <= v <= MAX_TOKENS and v == int(v):
                bound = float(v)
                break
        if bound is None:
            bound = min(float(MAX_TOKENS), RESERVE_FACTOR * math.exp(min(e.log_tokens, 20.0)))
        return e.prompt_tokens * max(prompt_scale, 1.0) * price[0] + bound * price[1]

    def apply(self, rec: dict) -> None:
        """Worker thread: a journaled "usage" record (applier.Applier): the completion tokens observed
        for its request's feature entry (the quality record's target), and its cost in the ledger."""
        e = self.features.get(rec["rid"]) if self.features is not None else None
        ct = rec.get("completion_tokens")
        if e is not None and is_num(ct) and 0 <= ct <= MAX_TOKENS:
            e.observed_tokens = float(ct)
        self.ledger.apply(rec)
        self.unsettled.pop(rec.get("rid"), None)

    async def usage(self, key, keys) -> dict:
        """GET /v1/usage (usage_view), with every journaled usage record applied."""
        def view():
            self.drain()
            return usage_view(self.ledger, key, keys)
        return await asyncio.get_running_loop().run_in_executor(self.worker, view)

    def record_usage(self, rid: str, model: str, key: str, usage: dict | None, latency_s: float,
                     ttft_s: float | None, approx_tokens: int | None = None, hold: "Hold | None" = None,
                     aborted: str | None = None) -> None:
        """Settle a proxied call: journal its observed usage and what it cost (not awaited: nobody
        waits on it; the cost counts as held until the ledger applies it), then release its
        reservation `hold`. Cost: the backend's token counts (our prompt count when it gives none) at
        the LLM's prices; else, for a stream that ended early (`aborted`: "client" or "backend"), the
        prompt plus the `approx_tokens` content deltas relayed; else the predicted cost of the
        request's feature entry."""
        try:
            self._record_usage(rid, model, key, usage, latency_s, ttft_s, approx_tokens, aborted)
        finally:
            self.release(hold)

    def _record_usage(self, rid, model, key, usage, latency_s, ttft_s, approx_tokens, aborted) -> None:
        e = self.features.get(rid)

        def count(v):  # a backend's token count, if plausible (a huge or odd one is ignored)
            return int(v) if is_num(v) and 0 <= v <= MAX_TOKENS else None

        ct = pt = None
        if isinstance(usage, dict):
            ct, pt = count(usage.get("completion_tokens")), count(usage.get("prompt_tokens"))
        approx = ct is None and approx_tokens is not None
        if approx:
            ct = count(approx_tokens)
        if e is not None and ct is not None:
            e.observed_tokens = float(ct)
        cost, source = None, None
        price = self.live.prices.get(model)
        if e is not None and price is not None:
            pin, pout = price
            if ct is not None and (not approx or aborted):
                cost = (e.prompt_tokens if pt is None else pt) * pin + ct * pout
                source = "streamed" if approx else "usage"
            else:
                cost, source = e.prompt_tokens * pin + math.exp(e.log_tokens) * pout, "predicted"
        self.metrics.learning.feedback.labels("usage").inc()
        self.metrics.backends.seconds.labels(model).observe(latency_s)
        rec = {"type": "usage", "rid": rid, "model": model, "key": key, "completion_tokens": ct, "prompt_tokens": pt,
               "tokens_approximate": approx, "cost_usd": cost, "cost_source": source, "t": round(time.time(), 3),
               "latency_s": round(latency_s, 6), "ttft_s": None if ttft_s is None else round(ttft_s, 6)}
        if aborted:
            rec["aborted"] = aborted
        if cost is not None:
            self.unsettled[rid] = (key, cost)
        try:
            fut = self.journal.append(rec)
        except BaseException:
            self.unsettled.pop(rid, None)
            raise

        def done(f):
            if f.exception():
                self.unsettled.pop(rid, None)
                log.error("usage record lost: %s", f.exception())
        fut.add_done_callback(done)


@dataclasses.dataclass(eq=False)
class Hold:
    """An open reservation: its id in Spend.holds, the key's account name, USD reserved."""

    id: int
    key: str
    usd: float = 0.0

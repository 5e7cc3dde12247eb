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
  key's per-request cap and what is left of the key's day (UTC) and month budgets; once a period's
  budget is spent the router picks the cheapest eligible LLM (cap 0), or answers 429 when the key
  says ``when_exhausted: reject``. Calls in flight are not reserved: concurrent calls may overshoot
  a budget by what they cost.
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


def cost_cap(ledger: Ledger, key: ApiKey | None, requested: float | None, now: float | None = None) -> float | None:
    """The request's cost cap in USD (None: none; 0: the cheapest eligible LLM) under its key's
    budget; ApiError 429 when the budget is spent and the key says "reject"."""
    budget = None if key is None else key.budget
    if budget is None:
        return requested
    caps = [c for c in (requested, budget.max_cost_usd) if c is not None]
    a = ledger.accounts.get(key.name, Account())
    left = remaining(a, budget, time.time() if now is None else now)
    if left <= 0:
        if budget.when_exhausted == "reject":
            raise ApiError(429, f"the budget of API key {key.name!r} is spent for this period (see GET /v1/usage)",
                           "budget_exhausted", code="budget_exhausted")
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

    def apply(self, rec: dict) -> None:
        """Worker thread: a journaled "usage" record (applier.Applier): the completion tokens observed
        for its request's feature entry (the quality record's target), and its cost in the ledger."""
        e = self.features.get(rec["rid"]) if self.features is not None else None
        ct = rec.get("completion_tokens")
        if e is not None and is_num(ct) and 0 <= ct <= MAX_TOKENS:
            e.observed_tokens = float(ct)
        self.ledger.apply(rec)

    async def usage(self, key, keys) -> dict:
        """GET /v1/usage (usage_view), with every journaled usage record applied."""
        def view():
            self.drain()
            return usage_view(self.ledger, key, keys)
        return await asyncio.get_running_loop().run_in_executor(self.worker, view)

    def record_usage(self, rid: str, model: str, key: str, usage: dict | None, latency_s: float,
                     ttft_s: float | None, approx_tokens: int | None = None) -> None:
        """Journal the observed usage of a proxied call and what it cost (not awaited: nobody waits on
        it). Cost: the backend's token counts (our prompt count when it gives none) at the LLM's
        prices, else the predicted cost of the request's feature entry."""
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
            if ct is not None and not approx:
                cost, source = (e.prompt_tokens if pt is None else pt) * pin + ct * pout, "usage"
            else:
                cost, source = e.prompt_tokens * pin + math.exp(e.log_tokens) * pout, "predicted"
        self.metrics.learning.feedback.labels("usage").inc()
        self.metrics.backends.seconds.labels(model).observe(latency_s)
        rec = {"type": "usage", "rid": rid, "model": model, "key": key, "completion_tokens": ct, "prompt_tokens": pt,
               "tokens_approximate": approx, "cost_usd": cost, "cost_source": source, "t": round(time.time(), 3),
               "latency_s": round(latency_s, 6), "ttft_s": None if ttft_s is None else round(ttft_s, 6)}
        fut = self.journal.append(rec)
        fut.add_done_callback(lambda f: f.exception() and log.error("usage record lost: %s", f.exception()))

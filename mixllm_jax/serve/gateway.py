"""What a gateway adds around a decision: the OpenAI `model` field, per-request candidate LLMs,
and fallbacks to the next-best LLM when a backend fails.

* `model` (chat and /v1/route): ``"mixllm"`` (or ``"auto"``, or absent) routes with the
  checkpoint's policy; ``"mixllm:budget=0.2"`` operates at a mean cost of 0.2 x the reference
  LLM's (the checkpoint's operating curve, as ``train --budget 20%``); ``"mixllm:cost_weight=50"``
  sets lambda; an LLM's own name pins the request to it (``--pinned-models refuse``: a 400). A
  pinned request is still routed (features, explanation and feedback as usual) among that LLM only.
* ``allowed_models`` / ``blocked_models``: the request's candidates (unknown names: a 400 naming
  them; none left: a 400).
* Fallbacks: a backend error or timeout (before any byte of the answer was sent) puts the LLM on a
  cooldown (`--cooldown-s`: not eligible for chat meanwhile) and counts in its failure rate (no
  quality is recorded: a failure is about availability, and whoever may route could cause it),
  and tries the next-best eligible LLM of the same decision (scores of its explanation) whose
  reservation the key's budget covers, at most `--fallbacks` more. Each attempt has its own
  request id and feature entry, so feedback goes to the LLM that answered.
* Reservations (spend.py): a chat call reserves its predicted maximum cost against the key's
  budget once routed (`reserve`); when the budget cannot cover it, the request is routed again as
  for an exhausted budget (cap 0: the cheapest eligible LLM), or answered 429 (``reject``).

The request checks are functions of the live state (live.Live); `Gateway` holds what a chat
request needs besides: the ledger (key budgets), the feature store (fallback entries), the proxy
and the cooldowns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import re
import time
import uuid

import numpy as np

from mixllm_jax.core import observation
from mixllm_jax.store import journal
from mixllm_jax.serve.http import MAX_COST_WEIGHT, ApiError, policy_fields, routing_text, show
from mixllm_jax.serve.proxy import BackendFailure
from mixllm_jax.serve.spend import cost_cap, key_name

ALIAS = "mixllm"
ALIASES = (ALIAS, "auto")
MAX_NAMES = 256
_POINT = re.compile(r"mixllm:(budget|cost_weight)=([0-9.eE+-]{1,32})")


def parse_model(live, value, pinned_models: str = "allow") -> tuple[tuple | None, str | None]:
    """The `model` field -> (operating point (cost_weight, mix_cost_weight, mix) or None for the
    router's, pinned LLM name or None). 400 naming the field for anything else. live: live.Live;
    pinned_models: --pinned-models."""
    if value is None or value in ALIASES:
        return None, None
    if not isinstance(value, str):
        raise ApiError(400, f"field 'model' must be a string, got {show(value)}", param="model")
    m = _POINT.fullmatch(value)
    if m:
        kind, text = m[1], m[2]
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if kind == "cost_weight":
            if not 0 <= v <= MAX_COST_WEIGHT:
                raise ApiError(400, f"model {value!r}: cost_weight must be a number in [0, {MAX_COST_WEIGHT:g}]",
                               param="model")
            return (v, 0.0, 0.0), None
        if not 0 < v <= 10:
            raise ApiError(400, f"model {value!r}: budget is a share of the reference LLM's mean cost, in (0, 10] "
                                f"(0.2 = 20%)", param="model")
        return budget_point(live, v), None
    if value in live.registry.slots:
        if pinned_models != "allow":
            raise ApiError(400, f"model {value!r} names an LLM, and this router does not take pinned requests: "
                                f"use {ALIAS!r} or {ALIAS}:budget=<share>", param="model")
        return None, value
    raise ApiError(400, f"unknown model {value[:80]!r}: use {ALIAS!r}, '{ALIAS}:budget=<share>', "
                        f"'{ALIAS}:cost_weight=<lambda>' or one of the LLMs of GET /v1/models", param="model")


def budget_point(live, share: float) -> tuple:
    """The operating point of a mean cost of `share` x the reference LLM's, on the checkpoint's curve."""
    from mixllm_jax.core.config import Budget

    r = live.router
    ref = r.config.budget.reference if r.config.budget.kind == "share" else None
    try:
        p = r.policy_for(Budget("share", share, ref))
    except ValueError as e:
        raise ApiError(400, f"{e} ('{ALIAS}:cost_weight=<lambda>')", param="model") from None
    return float(p.cost_weight), float(p.mix_cost_weight), float(p.mix)


@dataclasses.dataclass
class RequestPolicy:
    """How one request is routed: operating point (None: the router's), cost cap in USD (None:
    none), candidates [K] bool, pinned LLM (or None), the key's account name."""

    point: tuple | None
    max_cost_usd: float | None
    candidates: np.ndarray
    pinned: str | None
    key: str


def _names(body: dict, key: str, known: dict) -> list[str] | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > MAX_NAMES or not all(isinstance(n, str) for n in v):
        raise ApiError(400, f"field {key!r} must be a list of at most {MAX_NAMES} LLM names", param=key)
    unknown = sorted({n for n in v if n not in known})
    if unknown:
        raise ApiError(400, f"field {key!r} names unknown LLM(s) {[u[:80] for u in unknown[:10]]} "
                            f"(known: {sorted(known)})", param=key)
    return v


def candidates(live, body: dict, pinned: str | None) -> np.ndarray:
    """[K] bool: the LLMs this request may go to (allowed_models minus blocked_models, or the
    pinned LLM); 400 when none is left."""
    slots = dict(live.registry.slots)
    allowed, blocked = _names(body, "allowed_models", slots), _names(body, "blocked_models", slots)
    mask = np.zeros(live.state.capacity, bool)
    mask[[slots[n] for n in (slots if allowed is None else allowed)]] = True
    mask[[slots[n] for n in blocked or ()]] = False
    if pinned is not None:
        if not mask[slots[pinned]]:
            raise ApiError(400, f"model {pinned!r} is excluded by allowed_models / blocked_models", param="model")
        mask[:] = False
        mask[slots[pinned]] = True
    if not mask.any():
        raise ApiError(400, "allowed_models / blocked_models leave no candidate LLM", param="allowed_models")
    return mask


def prompt_scale(body: dict, route_on: str) -> float:
    """How much longer the conversation a backend bills is than the text routed on (characters; 1
    when the whole conversation is routed on), the reservation's factor on the routed prompt tokens."""
    if route_on == "conversation":
        return 1.0
    try:
        whole, routed = routing_text(body.get("messages"), "conversation"), routing_text(body.get("messages"), route_on)
    except ApiError:
        return 1.0
    return max(1.0, len(whole) / max(len(routed), 1))


def fallback_order(res: dict, backends: dict) -> list[str]:
    """The decision's other eligible LLMs with a backend, best score first."""
    ex = res["explanation"]
    others = [m for m, v in ex.items() if v["eligible"] and m != res["model"] and m in backends]
    return sorted(others, key=lambda m: -(ex[m]["score"] if ex[m]["score"] is not None else -math.inf))


class Gateway:
    """A chat or route request's policy, and a chat request's path to an answer (see the module
    docstring). live: the live state; ledger: spend.Ledger (key budgets, decision counts);
    features: journal.FeatureStore; proxy: proxy.Proxy; metrics: prometheus.Metrics; worker: the
    worker thread's executor; fallbacks, cooldown_s, pinned_models: ServeConfig's."""

    def __init__(self, live, *, ledger, features, proxy, metrics, worker, fallbacks: int, cooldown_s: float,
                 pinned_models: str, route_on: str = "last_user"):
        self.live, self.ledger, self.features, self.proxy = live, ledger, features, proxy
        self.metrics, self.worker = metrics, worker
        self.fallbacks, self.cooldown_s, self.pinned_models = fallbacks, cooldown_s, pinned_models
        self.route_on = route_on

    def request_policy(self, body: dict, key) -> RequestPolicy:
        """The request's `model`, `cost_weight`, `max_cost_usd`, `allowed_models` and `blocked_models`
        under its API key's budget (spend.cost_cap: 429 when spent and the key says so)."""
        cw, max_cost = policy_fields(body)
        point, pinned = parse_model(self.live, body.get("model"), self.pinned_models)
        if cw is not None and point is not None:
            raise ApiError(400, "give the operating point once: in 'model' or in 'cost_weight', not both",
                           param="cost_weight")
        if cw is not None:
            point = (cw, 0.0, 0.0)
        cand = candidates(self.live, body, pinned)
        held = self.proxy.spend.held(key.name) if key is not None and key.budget is not None else 0.0
        return RequestPolicy(point, cost_cap(self.ledger, key, max_cost, held=held), cand, pinned, key_name(key))

    def reserve(self, key, res: dict, body: dict, pol: RequestPolicy, force: bool = False):
        """A routed chat call's reservation (spend.Spend.reserve; 429 when the budget cannot cover it
        and the key says "reject"); None when it cannot and the request should be routed again at cap 0
        (a pinned request, or one that got the cheapest eligible LLM already, reserves anyway)."""
        ex = res["explanation"]
        costs = {m: v["cost"] for m, v in ex.items() if v["eligible"] and v["cost"] is not None}
        cheapest = bool(costs) and costs.get(res["model"], math.inf) <= min(costs.values())
        force = force or pol.pinned is not None or cheapest
        return self.proxy.spend.reserve(key, res["request_id"], res["model"], body, prompt_scale(body, self.route_on),
                                        force=force)

    def chat_mask(self, cand: np.ndarray) -> np.ndarray:
        """The candidates a chat request may go to now: with a backend, not cooling down (503 if none)."""
        mask = cand & self.live.backend_mask[:len(cand)]
        if not mask.any():
            raise ApiError(503, "no candidate LLM has a backend configured (backends.yaml or POST /v1/models)",
                           "no_backend")
        cool = self.cooling_mask()
        if not (mask & ~cool).any():
            wait = max(1, math.ceil(min(self.live.cooldown.values()) - time.monotonic()))
            raise ApiError(503, "every candidate LLM is cooling down after backend failures; retry later",
                           "overloaded", headers={"Retry-After": str(wait)})
        return mask & ~cool

    async def chat_with_fallbacks(self, body: dict, res: dict, stream: bool, pinned: bool, key=None, hold=None):
        """Proxy to the decision's LLM; on a backend failure cool it down and try the next-best ones
        (none for a pinned request) whose reservation the budget of `key` covers, moving `hold` (the
        call's reservation, released by the caller or the stream) to each. The answer names the
        attempts that failed; when all fail, the last failure is answered, naming the others."""
        order = [] if pinned else fallback_order(res, self.live.backends)
        failed: list[dict] = []
        attempt = res
        while True:
            try:
                return await self.proxy.proxy(body, attempt, stream, failed, hold)
            except BackendFailure as e:
                self.cool_down(attempt["model"])
                failed.append({"model": attempt["model"], "request_id": attempt["request_id"], "error": e.message})
                nxt = next((m for m in order if self.live.cooldown.get(m, 0.0) <= time.monotonic()), None)
                if nxt is None or len(failed) > self.fallbacks:
                    if len(failed) > 1:
                        e.message += "; also failed: " + ", ".join(repr(f["model"]) for f in failed[:-1])
                    raise
                order.remove(nxt)
                attempt = await asyncio.get_running_loop().run_in_executor(
                    self.worker, functools.partial(self.fallback_attempt, res, nxt))
                if hold is not None:
                    try:
                        moved = self.proxy.spend.reserve(key, attempt["request_id"], nxt, body,
                                                         prompt_scale(body, self.route_on), hold=hold)
                    except ApiError:
                        moved = None
                    if moved is None:  # the budget covers no fallback: the failure is the answer
                        e.message += f"; no fallback: the budget of the API key cannot cover a call to {nxt!r}"
                        raise e from None

    def fallback_attempt(self, res: dict, model: str) -> dict:
        """Worker thread: a route result for `model`, the fallback of decision `res`, with its own
        request id and feature entry (the same features; the fallback LLM's slot and predicted tokens)."""
        e = self.features.get(res["request_id"])
        slot = self.live.registry.slots.get(model)
        if e is None or slot is None:
            raise ApiError(503, f"model {model!r} was removed meanwhile; retry", "no_backend")
        rid = "req-" + uuid.uuid4().hex
        tokens = res["explanation"][model]["tokens"] or 1.0
        self.features.put_many([(rid, journal.Entry(
            x=e.x, slot=slot, generation=int(self.live.generation[slot]), model=model,
            prompt_tokens=e.prompt_tokens, log_tokens=float(observation.log_tokens(tokens)), propensity=1.0))])
        self.ledger.decision(res["_key"], model)
        return dict(res, request_id=rid, model=model, _backend=self.live.backends.get(model))

    def cool_down(self, model: str) -> None:
        """Keep chat away from `model` for --cooldown-s seconds."""
        self.metrics.backends.fallbacks.labels(model).inc()
        self.live.cooldown[model] = time.monotonic() + self.cooldown_s

    def cooling_mask(self) -> np.ndarray:
        """[K] bool: the slots whose LLM is cooling down after a backend failure."""
        now = time.monotonic()
        live = self.live
        live.cooldown = {m: t for m, t in live.cooldown.items() if t > now}
        mask = np.zeros(live.state.capacity, bool)
        for m in live.cooldown:
            if m in live.registry.slots:
                mask[live.registry.slots[m]] = True
        return mask

    def router_models(self, created: int) -> list[dict]:
        """GET /v1/models entries of the router's aliases (before the LLMs)."""
        curve = self.live.router.curve is not None
        points = [f"{ALIAS}:cost_weight=<lambda>"] + ([f"{ALIAS}:budget=<share>"] if curve else [])
        return [{"id": ALIAS, "object": "model", "created": created, "owned_by": "mixllm-jax", "kind": "router",
                 "aliases": list(ALIASES[1:]), "operating_points": points}]

"""Stream simulation over logged outcomes: latency-aware routing under load, online learning, events.

The logs are full-information (every LLM's answer to every query was recorded), so whichever LLM a
method picks, its quality score and completion tokens are looked up. Around that, a discrete-event
model of a deployment (docs/architecture.md, "Latency model"):

* Queries arrive at `StreamConfig.rate` per second (default 10: "100 queries per 10 s"), evenly
  spaced or as a Poisson process. Every `batch_s` seconds the queries that arrived in that window
  are routed as one batch by the jitted `policy.route_batch` (in-batch load on), with the router's
  clock at the window start; each query is then dispatched at its own arrival time. (Routing a
  window at its start over-estimates a query's wait by at most `batch_s`: a conservative router.)
* The world: each LLM serves up to `max_concurrency` requests at once, first come first served,
  and a request takes ttft + (recorded completion tokens) / tokens_per_s -- the *true* service
  time, while the router books its *predicted* one. The router sees the world's load only as a
  snapshot refreshed every `refresh_s` seconds (default 10; None or 0 = every batch), plus the
  bookings it made itself since.
* A query whose wait (arrival -> start of the answer that is finally shown) exceeds
  `tolerance_s` (default 30 s) scores quality 0 (it is still served and paid). A user is
  satisfied when quality > 0.7 and wait < 15 s.
* Online learning (`learning`): "none"; "refined": the chosen LLM's observed quality and
  completion tokens update its arm (`bandit.update_batch`, bandit feedback: the other LLMs'
  outcomes stay unseen); "binary": only satisfied / not satisfied is observed and trains the
  dynamic feedback network (`feedback_net.update`), whose score term enters `route_batch` as `bonus`;
  the update is on-policy: it differentiates the policy the decisions were drawn from
  (softmax over the full score at the policy's temperature) and weights each decision by its
  logged propensity. Feedback of a batch is applied before the next batch is routed.
* Stochastic policies (Thompson sampling, a softmax temperature, epsilon-mixing) draw from
  jax.random.PRNGKey(config.seed), split per batch; every decision's propensity is recorded
  (`StreamResult.propensity`), so a stream is also a log for off-policy evaluation (ope.py).
* Events change the set of LLMs and their prices mid-stream (`AddLLM`, `RemoveLLM`, `SetPrice`):
  arm slots are reused inside the state's capacity, so nothing recompiles (the compile counters of
  the jitted functions are recorded in `StreamResult.info`).

Baselines run in the same world (``baselines.py``): single LLMs, a uniform random mix, and a cascade
that tries a cheap LLM first and escalates to the next LLM of its chain while the answer's quality is
below 0.7 (known only after the answer is back), paying every stage's cost and latency. The events
are ``events.py``'s.

The RouterBench latency profiles in models.json (ttft_s, tokens_per_s, max_concurrency) are
ASSUMPTIONS, not measurements (`LATENCY_NOTE`): every report written from a simulation says so.

Event bookkeeping is plain Python over batches; the per-query work of a batch (routing, the
world's FCFS queue, the updates) runs in jitted functions, with no Python loop over queries.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixllm_jax.core import bandit, engine, feedback_net, observation
from mixllm_jax.core.padding import bucket, pad_rows
from mixllm_jax.data import Dataset, ModelSpec
from mixllm_jax.offline.evaluate import task_keys
from mixllm_jax.core.latency import DEFAULT_MAX_CONCURRENCY, DEFAULT_TOKENS_PER_S, DEFAULT_TTFT_S
from mixllm_jax.core.policy import Policy, advance_clock, commit_load, route_batch
from mixllm_jax.core.state import ArmRegistry, RouterState
from mixllm_jax.sim.events import Event, apply_event, slot_models

REFERENCE = "gpt-4-1106-preview"
LEARNING_MODES = ("none", "refined", "binary")
LATENCY_NOTE = ("Latency profiles (ttft_s, tokens_per_s, max_concurrency) come from the models file; "
                "for RouterBench's LLMs they are ASSUMPTIONS (order-of-magnitude figures for hosted APIs), "
                "not measurements, so every wait, timeout and satisfaction figure here depends on them.")
MAINTAIN_EVERY = 64  # batches between float32 drift checks of the bandit state
MIN_TEMPERATURE = 0.01  # the binary update's softmax temperature when the routing policy has none


# ----------------------------------------------------------------------------------------------
# Configuration, the world, the stream
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """How queries arrive and are judged.

    rate: queries per second (10 = the paper's 100 per 10 s).  arrival: "uniform" | "poisson".
    batch_s: routing window (s): the queries arriving in one window form one route_batch call.
    refresh_s: how often the router's load snapshot is refreshed from the world (s); None or 0:
      every batch ("continuous").
    tolerance_s: a query waiting longer scores quality 0.
    satisfied_quality, satisfied_wait_s: a user is satisfied when quality > satisfied_quality and
      wait < satisfied_wait_s.
    seed: arrivals (poisson) and random choices.
    """

    rate: float = 10.0
    arrival: str = "uniform"
    batch_s: float = 1.0
    refresh_s: float | None = 10.0
    tolerance_s: float = 30.0
    satisfied_quality: float = 0.7
    satisfied_wait_s: float = 15.0
    seed: int = 0

    def __post_init__(self):
        if not (np.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number of queries per second, got {self.rate!r}")
        if self.arrival not in ("uniform", "poisson"):
            raise ValueError(f"arrival must be 'uniform' or 'poisson', got {self.arrival!r}")
        if not (np.isfinite(self.batch_s) and self.batch_s > 0):
            raise ValueError(f"batch_s must be > 0, got {self.batch_s!r}")
        if self.refresh_s is not None and not (self.refresh_s >= 0):
            raise ValueError(f"refresh_s must be >= 0 or None, got {self.refresh_s!r}")
        if not self.tolerance_s > 0:
            raise ValueError(f"tolerance_s must be > 0, got {self.tolerance_s!r}")


@dataclasses.dataclass
class World:
    """The true LLMs, one entry per model column (M): prices (USD/token) and latency profile."""

    models: list[str]
    price_in: np.ndarray
    price_out: np.ndarray
    ttft: np.ndarray
    tokens_per_s: np.ndarray
    max_concurrency: np.ndarray

    @classmethod
    def from_specs(cls, specs: Sequence[ModelSpec], ttft: float = DEFAULT_TTFT_S,
                   tokens_per_s: float = DEFAULT_TOKENS_PER_S,
                   max_concurrency: int = DEFAULT_MAX_CONCURRENCY) -> "World":
        """Missing latency figures take the given defaults (the same ones train.new_state uses)."""
        f = lambda vals: np.asarray(vals, np.float64)  # noqa: E731
        return cls(models=[s.name for s in specs],
                   price_in=f([s.price_in for s in specs]), price_out=f([s.price_out for s in specs]),
                   ttft=f([ttft if s.ttft_s is None else s.ttft_s for s in specs]),
                   tokens_per_s=f([s.tokens_per_s or tokens_per_s for s in specs]),
                   max_concurrency=np.asarray([s.max_concurrency or max_concurrency for s in specs], np.int32))

    def copy(self) -> "World":
        return dataclasses.replace(self, models=list(self.models), price_in=self.price_in.copy(),
                                   price_out=self.price_out.copy())

    def index(self, name: str) -> int:
        if name not in self.models:
            raise ValueError(f"model {name!r} is not in the world (models: {self.models})")
        return self.models.index(name)

    def service_s(self, model: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """True seconds to serve `tokens` completion tokens on `model` (both [B])."""
        return self.ttft[model] + tokens / self.tokens_per_s[model]

    def cost(self, model: np.ndarray, prompt_tokens: np.ndarray, completion_tokens: np.ndarray) -> np.ndarray:
        """USD at the world's current prices."""
        return prompt_tokens * self.price_in[model] + completion_tokens * self.price_out[model]

    def empty_load(self, slots: int | None = None) -> np.ndarray:
        """free_at [M, C]: every slot free at t = 0, slots past max_concurrency never free."""
        c = int(self.max_concurrency.max()) if slots is None else int(slots)
        if c < self.max_concurrency.max():
            raise ValueError(f"{c} load slots < the largest max_concurrency {self.max_concurrency.max()}")
        return np.where(np.arange(c)[None, :] < self.max_concurrency[:, None], 0.0, np.inf).astype(np.float32)


@dataclasses.dataclass
class Stream:
    """The queries of a stream in arrival order (N queries, M model columns, d features)."""

    x: np.ndarray | None  # [N, d] router features (None: baselines only)
    prompt_tokens: np.ndarray  # [N]
    quality: np.ndarray  # [N, M] logged
    completion_tokens: np.ndarray  # [N, M] logged
    ref_cost: np.ndarray  # [N] logged cost of the reference LLM
    tasks: list[str]  # [N]
    models: list[str]  # [M]
    arrival: np.ndarray  # [N] s, non-decreasing
    batch: np.ndarray  # [N] window index, non-decreasing
    batch_s: float
    reference: str = REFERENCE

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def ref(self) -> int:
        return self.models.index(self.reference)

    def batches(self) -> list[tuple[int, int, float]]:
        """[(first row, end row, window start time)] of the non-empty windows."""
        cuts = np.flatnonzero(np.diff(self.batch)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(self)]])
        return [(int(s), int(e), float(self.batch[s] * self.batch_s)) for s, e in zip(starts, ends)]

    def padded_size(self) -> int:
        """One padded batch size for the whole stream (a bucket): one compile per stream shape."""
        n = int(np.diff([s for s, _, _ in self.batches()] + [len(self)]).max())
        return bucket(max(n, 1))


def make_stream(dataset: Dataset, x: np.ndarray | None = None, config: StreamConfig = StreamConfig(),
                reference: str = REFERENCE) -> Stream:
    """Queries of `dataset` in row order, arriving as `config` says; x [N, d] are router features."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the stream has no queries")
    if reference not in dataset.models:
        raise ValueError(f"reference {reference!r} is not a model of the dataset: {dataset.models}")
    if x is not None and len(x) != n:
        raise ValueError(f"x has {len(x)} rows, the dataset {n}")
    if np.isnan(dataset.quality).any() or np.isnan(dataset.completion_tokens).any():
        raise ValueError("the stream needs every logged quality and completion-token count (no NaN)")
    if config.arrival == "uniform":
        arrival = np.arange(n) / config.rate
    else:
        gaps = np.random.default_rng(config.seed).exponential(1.0 / config.rate, n)
        arrival = np.cumsum(gaps) - gaps[0]
    batch = np.floor(arrival / config.batch_s + 1e-9).astype(np.int64)
    ref = dataset.models.index(reference)
    return Stream(x=None if x is None else np.asarray(x, np.float32),
                  prompt_tokens=dataset.prompt_tokens.astype(np.float64),
                  quality=dataset.quality.astype(np.float64),
                  completion_tokens=dataset.completion_tokens.astype(np.float64),
                  ref_cost=dataset.cost[:, ref].astype(np.float64), tasks=task_keys(dataset.tags),
                  models=list(dataset.models), arrival=arrival, batch=batch, batch_s=config.batch_s,
                  reference=reference)


# ----------------------------------------------------------------------------------------------
# The world's FCFS queues (jitted)
# ----------------------------------------------------------------------------------------------


@jax.jit
def serve(free_at, model, start, duration, valid):
    """Book requests in order on the world's queues: free_at [M, C], model [B] int, start [B] s
    (dispatch time), duration [B] s, valid [B] bool. Each request takes its model's earliest-free
    slot. Returns (wait [B] s until its service starts, free_at [M, C])."""

    def step(load, inp):
        m, t, dur, ok = inp
        row = load[m]
        c = jnp.argmin(row)
        begin = jnp.maximum(row[c], t)
        load = jnp.where(ok, load.at[m, c].set(begin + dur), load)
        return load, begin - t

    load, w = jax.lax.scan(step, free_at, (model, start, duration, valid))
    return jnp.where(valid, w, 0.0), load


def serve_padded(free_at, model, start, duration, size):
    """serve() on numpy inputs padded to `size` (rows beyond len(model) are padding)."""
    n = len(model)
    w, free_at = serve(free_at, jnp.asarray(pad_rows(model.astype(np.int32), size)),
                       jnp.asarray(pad_rows(start.astype(np.float32), size)),
                       jnp.asarray(pad_rows(duration.astype(np.float32), size)), jnp.asarray(np.arange(size) < n))
    return np.asarray(w)[:n].astype(np.float64), free_at


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StreamResult:
    """Per-query outcomes of one method over a stream (N queries)."""

    name: str
    stream: Stream
    config: StreamConfig
    model: np.ndarray  # [N] model column of the answer shown to the user
    wait: np.ndarray  # [N] s, arrival -> start of that answer
    quality_raw: np.ndarray  # [N] logged quality of that answer (no deadline)
    cost: np.ndarray  # [N] USD, every stage tried
    stages: np.ndarray  # [N] LLM calls made (1 except the cascade)
    predicted_wait: np.ndarray | None = None  # [N] router's predicted wait of its choice
    propensity: np.ndarray | None = None  # [N] probability the router's policy had of its choice
    info: dict = dataclasses.field(default_factory=dict)
    state: RouterState | None = None
    registry: ArmRegistry | None = None
    feedback_state: feedback_net.FeedbackState | None = None

    @property
    def timed_out(self) -> np.ndarray:
        return self.wait > self.config.tolerance_s

    @property
    def quality(self) -> np.ndarray:
        """Quality with the deadline: 0 for a query that waited past the tolerance."""
        return np.where(self.timed_out, 0.0, self.quality_raw)

    @property
    def satisfied(self) -> np.ndarray:
        return (self.quality > self.config.satisfied_quality) & (self.wait < self.config.satisfied_wait_s)

    def summary(self, rows=None) -> dict:
        """Quality % / cost % of the reference's logged totals on the same queries, waits, shares."""
        s = self.stream
        rows = np.arange(len(s)) if rows is None else np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.size == 0:
            return {"n": 0}
        ref_q = s.quality[rows, s.ref].sum()
        ref_c = s.ref_cost[rows].sum()
        pct = lambda v, r: float(100.0 * v / r) if r > 0 else None  # noqa: E731
        w = self.wait[rows]
        counts = np.bincount(self.model[rows], minlength=len(s.models))
        return {
            "n": int(rows.size),
            "quality_pct": pct(self.quality[rows].sum(), ref_q),
            "quality_pct_no_deadline": pct(self.quality_raw[rows].sum(), ref_q),
            "cost_pct": pct(self.cost[rows].sum(), ref_c),
            "mean_wait_s": float(w.mean()),
            "p95_wait_s": float(np.percentile(w, 95)),
            "max_wait_s": float(w.max()),
            "timeout_pct": float(100.0 * self.timed_out[rows].mean()),
            "satisfaction_pct": float(100.0 * self.satisfied[rows].mean()),
            "mean_calls": float(self.stages[rows].mean()),
            "share": {m: float(c / rows.size) for m, c in zip(s.models, counts) if c},
        }

    def timeline(self, n_windows: int = 20) -> list[dict]:
        """summary() over `n_windows` equal slices of the stream's arrival time (plus t0, t1)."""
        t = self.stream.arrival
        edges = np.linspace(t[0], t[-1] + 1e-6, n_windows + 1)
        out = []
        for a, b in zip(edges[:-1], edges[1:]):
            rows = np.flatnonzero((t >= a) & (t < b))
            if rows.size:
                out.append({"t0": float(a), "t1": float(b), **self.summary(rows)})
        return out


def make_result(name, stream, config, model, wait, cost, stages, **kw) -> StreamResult:
    """The StreamResult of a method's choices `model` [N] (the quality looked up without the deadline)."""
    quality_raw = stream.quality[np.arange(len(stream)), model]
    return StreamResult(name=name, stream=stream, config=config, model=model.astype(np.int64),
                        wait=wait, quality_raw=quality_raw, cost=cost, stages=stages, **kw)


def progress_bar(items, desc, progress):
    """`items`, under a progress bar when `progress` (a terminal)."""
    if not progress:
        return items
    from mixllm_jax.util import progress as progress_mod
    return progress_mod.bar(items, desc=desc, unit="batch", leave=False)


def compile_counts() -> dict[str, int]:
    """Compiled variants held by the stream's jitted functions (a recompile adds one)."""
    return {"route_batch": route_batch._cache_size(), "update_batch": bandit.update_batch._cache_size(),
            "feedback_update": feedback_net.update._cache_size(), "feedback_bonus": feedback_net.bonus._cache_size(),
            "serve": serve._cache_size()}


# ----------------------------------------------------------------------------------------------
# The router in the stream
# ----------------------------------------------------------------------------------------------


def run_router(stream: Stream, world: World, state: RouterState, registry: ArmRegistry, policy: Policy,
               config: StreamConfig = StreamConfig(), *, learning: str = "none",
               feedback_state: feedback_net.FeedbackState | None = None, events: Sequence[Event] = (),
               name: str = "mixllm", progress: bool = True) -> StreamResult:
    """Route `stream` with `policy`, learning online as `learning` says; returns per-query outcomes,
    the final state / registry / feedback network, and `info` (compile counts, events applied).

    The inputs are not modified (`world` is copied: events may change its prices).
    """
    if learning not in LEARNING_MODES:
        raise ValueError(f"learning must be one of {LEARNING_MODES}, got {learning!r}")
    if stream.x is None or stream.x.shape[1] != state.dim:
        raise ValueError(f"the stream's features must be [N, {state.dim}] (the state's dim)")
    if list(world.models) != list(stream.models):
        raise ValueError("the world and the stream must list the same models in the same order")
    unknown = [n for n in registry.slots if n not in world.models]
    if unknown:
        raise ValueError(f"registered LLMs {unknown} are not models of the stream")
    if learning == "binary" and feedback_state is None:
        feedback_state = feedback_net.init_feedback(state.dim, state.capacity, seed=config.seed)
    world = world.copy()
    pending = sorted(events, key=lambda e: e.at)
    size = stream.padded_size()
    n = len(stream)
    load = jnp.asarray(world.empty_load(state.load_slots))  # the world's queues [M, C]
    slot_model = slot_models(registry, world, state.capacity)
    model = np.zeros(n, np.int64)
    wait = np.zeros(n)
    pred_wait = np.zeros(n)
    cost = np.zeros(n)
    fs = feedback_state
    applied, compiles = [], {"start": compile_counts()}
    last_refresh = -np.inf
    inf_row = np.full(state.load_slots, np.inf, np.float32)
    prop = np.ones(n)
    key = jax.random.PRNGKey(config.seed)
    for b, (lo, hi, t) in enumerate(progress_bar(stream.batches(), name, progress)):
        while pending and pending[0].at < hi:  # an event inside a window applies to the whole window
            ev = pending.pop(0)
            before = compile_counts()
            state, registry, world = apply_event(ev, state, registry, world)
            if fs is not None and state.capacity != fs.params["Dense_2"]["kernel"].shape[1]:
                raise ValueError(f"{ev} grew the state to {state.capacity} arm slots past the feedback network's "
                                 "capacity: start from a state with room for every LLM added (state.grow)")
            slot_model = slot_models(registry, world, state.capacity)
            applied.append({"at": int(ev.at), "row": lo, "time_s": t, "event": type(ev).__name__,
                            **{k: v for k, v in dataclasses.asdict(ev).items() if k != "at"},
                            "compiles_before": before})
        state = advance_clock(state, t)
        if not config.refresh_s or t - last_refresh >= config.refresh_s - 1e-9:
            load_np = np.asarray(load)
            view = np.stack([load_np[m] if m >= 0 else inf_row for m in slot_model])
            state = state.replace(free_at=jnp.asarray(view))
            last_refresh = t
        k = hi - lo
        book = np.arange(size) < k
        xb = jnp.asarray(pad_rows(stream.x[lo:hi], size))
        bonus = None if learning != "binary" else feedback_net.bonus(fs, xb)
        key, k_batch = jax.random.split(key)
        d = route_batch(state, xb, jnp.asarray(pad_rows(stream.prompt_tokens[lo:hi].astype(np.float32), size)),
                        policy, jnp.asarray(book), bonus, k_batch)
        state = commit_load(state, d)
        arm = np.asarray(d.arm)[:k]
        m = slot_model[arm]
        if (m < 0).any():
            raise RuntimeError(f"route_batch chose an empty arm slot {arm[m < 0][0]}")
        rows = np.arange(lo, hi)
        tokens = stream.completion_tokens[rows, m]
        w, load = serve_padded(load, m, stream.arrival[rows], world.service_s(m, tokens), size)
        model[rows], wait[rows] = m, w
        pred_wait[rows] = np.asarray(d.wait)[np.arange(k), arm]
        prop[rows] = np.asarray(d.propensity)[:k]
        cost[rows] = world.cost(m, stream.prompt_tokens[rows], tokens)
        if learning == "refined":
            targets = observation.targets(stream.quality[rows, m], tokens)
            state = bandit.update_batch(state, xb, jnp.asarray(pad_rows(arm.astype(np.int32), size)),
                                        jnp.asarray(pad_rows(targets, size)), jnp.asarray(book.astype(np.float32)))
            if (b + 1) % MAINTAIN_EVERY == 0:
                state, _ = bandit.maintain(state)
        elif learning == "binary":
            q = np.where(w > config.tolerance_s, 0.0, stream.quality[rows, m])
            reward = ((q > config.satisfied_quality) & (w < config.satisfied_wait_s)).astype(np.float32)
            fs = feedback_net.update(fs, xb, jnp.asarray(pad_rows(arm.astype(np.int32), size)),
                                 jnp.asarray(pad_rows(reward, size)), state.active, jnp.asarray(book),
                                 d.score - bonus, d.propensity, jnp.maximum(policy.temperature, MIN_TEMPERATURE))
    compiles["end"] = compile_counts()
    info = {"learning": learning, "policy": {"cost_weight": float(policy.cost_weight), "alpha": float(policy.alpha),
                                             "beta": float(policy.beta), "tau": float(policy.tau),
                                             "explore": policy.explore, "temperature": float(policy.temperature),
                                             "epsilon": float(policy.epsilon),
                                             "in_batch_load": bool(policy.in_batch_load)},
            "events": applied, "compiles": compiles, "padded_batch": size}
    return make_result(name, stream, config, model, wait, cost, np.ones(n, np.int64), predicted_wait=pred_wait,
                   propensity=prop, info=info, state=state, registry=registry, feedback_state=fs)

"""Baselines in the same simulated world as the router (``simulate.py``): single LLMs, a uniform
random mix, and a cascade that escalates while an answer's quality is below a threshold, paying every
stage's cost and latency; ``frontier_chain`` gives a cascade's natural order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from mixllm_jax.data import Dataset
from mixllm_jax.sim.simulate import (Stream, StreamConfig, StreamResult, World, make_result, progress_bar,
                                     serve_padded)


def run_choice(stream: Stream, world: World, choose: Callable[[np.ndarray], np.ndarray],
               config: StreamConfig = StreamConfig(), name: str = "choice", progress: bool = False) -> StreamResult:
    """A load-blind method: `choose(rows [B]) -> model column [B]` per batch, served by the world."""
    size = stream.padded_size()
    load = jnp.asarray(world.empty_load())
    n = len(stream)
    model, wait, cost = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
    for lo, hi, _ in progress_bar(stream.batches(), name, progress):
        rows = np.arange(lo, hi)
        m = np.asarray(choose(rows), np.int64)
        tokens = stream.completion_tokens[rows, m]
        w, load = serve_padded(load, m, stream.arrival[rows], world.service_s(m, tokens), size)
        model[rows], wait[rows] = m, w
        cost[rows] = world.cost(m, stream.prompt_tokens[rows], tokens)
    return make_result(name, stream, config, model, wait, cost, np.ones(n, np.int64))


def run_single(stream: Stream, world: World, model_name: str, config: StreamConfig = StreamConfig()) -> StreamResult:
    """Every query to one LLM."""
    j = world.index(model_name)
    return run_choice(stream, world, lambda rows: np.full(len(rows), j), config, model_name)


def run_random(stream: Stream, world: World, config: StreamConfig = StreamConfig(),
               models: Sequence[str] | None = None) -> StreamResult:
    """Uniformly random LLM (among `models`, default all) per query."""
    cols = np.array([world.index(m) for m in (models or world.models)])
    rng = np.random.default_rng(config.seed)
    return run_choice(stream, world, lambda rows: cols[rng.integers(0, len(cols), len(rows))], config, "random")


def run_cascade(stream: Stream, world: World, chain: Sequence[str], config: StreamConfig = StreamConfig(),
                threshold: float = 0.7, name: str | None = None, progress: bool = False) -> StreamResult:
    """Try chain[0]; while an answer's quality is below `threshold` (known once it is back) and
    another LLM is left, send the query to the next one when the answer arrives. Every stage's cost
    is paid; the wait is the time from arrival until the final answer's service starts (earlier
    stages' waits and full service times included).

    Within a batch each stage's requests are booked in dispatch-time order; across batches the
    queues are booked batch by batch (a later batch's first stage may be booked before an earlier
    batch's escalations that are dispatched after it: an approximation of at most a few seconds).
    """
    if not chain:
        raise ValueError("the cascade's chain is empty")
    cols = np.array([world.index(m) for m in chain])
    size = stream.padded_size()
    load = jnp.asarray(world.empty_load())
    n = len(stream)
    model, wait, cost = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
    stages = np.zeros(n, np.int64)
    for lo, hi, _ in progress_bar(stream.batches(), name or "cascade", progress):
        rows = np.arange(lo, hi)
        ready = stream.arrival[rows].copy()  # dispatch time of the current stage
        todo = np.arange(len(rows))  # positions still in the cascade
        for s, m in enumerate(cols):
            order = todo[np.argsort(ready[todo], kind="stable")]
            r = rows[order]
            tokens = stream.completion_tokens[r, m]
            dur = world.service_s(np.full(len(r), m), tokens)
            w, load = serve_padded(load, np.full(len(r), m), ready[order], dur, size)
            model[r] = m
            wait[r] = ready[order] + w - stream.arrival[r]
            cost[r] += world.cost(np.full(len(r), m), stream.prompt_tokens[r], tokens)
            stages[r] += 1
            ready[order] += w + dur
            escalate = stream.quality[r, m] < threshold
            todo = order[escalate]
            if todo.size == 0 or s == len(cols) - 1:
                break
    return make_result(name or "cascade[" + " > ".join(c.split("/")[-1] for c in chain) + "]",
                   stream, config, model, wait, cost, stages)


def frontier_chain(dataset: Dataset, max_len: int | None = None) -> list[str]:
    """LLMs on the (mean cost, mean quality) Pareto frontier of `dataset`, cheapest first: the
    natural cascade order. max_len keeps the cheapest, the best and evenly spaced ones between."""
    c, q = np.nanmean(dataset.cost, 0), np.nanmean(dataset.quality, 0)
    order = np.argsort(c, kind="stable")
    chain, best = [], -np.inf
    for j in order:
        if q[j] > best:
            chain.append(dataset.models[j])
            best = q[j]
    if max_len is not None and len(chain) > max_len:
        keep = np.unique(np.round(np.linspace(0, len(chain) - 1, max_len)).astype(int))
        chain = [chain[i] for i in keep]
    return chain

"""Evaluate routing methods on logged outcomes: % of a reference LLM, AIQ, per-task rows, report files.

A *method* is anything that picks one LLM per query of a test set, at one or more settings of its
knob (for a router, the cost weight lambda in quality per USD). Its choices are turned into
operating points (cost % and quality % of the reference LLM on the same queries), and its AIQ is
RouterBench's: the mean of the non-decreasing convex hull of its points over [0, c_max], with one
c_max (the largest cost % of any point of any method) shared by every method of the report.

Report schema (``report.json``)::

    {"reference": NAME, "n_queries": N, "models": [M names], "c_max_pct": x, "budgets_pct": [24.18],
     "cost_weights": [L],
     "tasks": {TASK: {"n_queries": n, "c_max_pct": x}},
     "methods": {NAME: {
         "kind": "sweep" | "single",          # single: one LLM (or any one-point method)
         "knob": "cost_weight" | "mix_prob" | null,
         "task_mean_quality": x,               # mean over tasks of mean quality x 100, first point
                                               # (cost weight 0 for a router): RouterDC's metric
         "aiq": x,                             # quality %, shared c_max
         "points": [{"cost_weight": l | null, "cost_pct": c, "quality_pct": q, ("mix_prob": p)}],
         "best_quality_at_cost_pct": {"24.18": q | null},   # best achieved point with cost <= 24.18
         "best_point_at_cost_pct": {"24.18": point | null},
         "per_task": {TASK: {"aiq": x, "best_quality_at_cost_pct": {...},
                             "points": [...], "best_point_at_cost_pct": {...}}}}}}
                                               # per-task points and best points: in memory and
                                               # in report.json with write_report(full=True) only

Per-task numbers are % of the reference on that task's queries, with that task's own shared c_max
(a task where the reference's total quality or cost is 0 gets ``aiq`` None and no points).
Its tables, plots and files: ``report.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from mixllm_jax.core import metrics

__all__ = [
    "COST_WEIGHTS",
    "PAPER_BUDGET_PCT",
    "Sweep",
    "task_keys",
    "choose_by_score",
    "points_for",
    "evaluate",
    "single_llm_methods",
]

COST_WEIGHTS: np.ndarray = np.concatenate([[0.0], np.logspace(0, 5, 41)])
"""Default lambda grid in quality per USD: 0, then 1 .. 1e5 log-spaced (8 points per decade).

Per-query costs on RouterBench are ~2e-5 .. 3e-2 USD and quality gaps ~0.05 .. 1, so routing moves
from "best quality" (lambda below ~10) to "cheapest LLM" (lambda ~1e5, where a 1e-5 USD gap
outweighs a quality point)."""

PAPER_BUDGET_PCT = 24.18
"""MixLLM's headline operating point: cost at most 24.18% of GPT-4's."""


class Sweep(NamedTuple):
    """A method's choices at several settings of its knob.

    chosen: [P, N] int model index per setting and query.
    knobs: [P] the knob's values (None for a one-point method such as a single LLM).
    knob: the knob's name, ``"cost_weight"`` (lambda), ``"mix_prob"``, or None.
    """

    chosen: np.ndarray
    knobs: Sequence[float] | None = None
    knob: str | None = "cost_weight"


def task_keys(tags: Sequence[Sequence[str]]) -> list[str]:
    """One task name per query: its tags joined by ``+`` (``"untagged"`` for none). [N] str."""
    return ["+".join(t) if t else "untagged" for t in tags]


def choose_by_score(q_hat, c_hat, cost_weights) -> np.ndarray:
    """The one offline decision rule: per query, argmax_m ``q_hat - lambda * c_hat``, ties to lower
    cost, every lambda scored in one pass (route_batch is the same rule with exploration and load).

    Args: q_hat [N, M], c_hat [N, M] (NaN quality = never chosen), cost_weights [L] (or a scalar).
    Returns: chosen [L, N] int32 ([N] for a scalar cost weight).
    """
    q = np.asarray(q_hat, np.float64)
    c = np.asarray(c_hat, np.float64)
    if q.shape != c.shape or q.ndim != 2:
        raise ValueError(f"q_hat and c_hat must both be [N, M], got {q.shape} and {c.shape}")
    q = np.where(np.isnan(q), -np.inf, q)
    c = np.where(np.isnan(c), np.inf, c)
    lams = np.atleast_1d(np.asarray(cost_weights, np.float64))
    s = q[None] - lams[:, None, None] * np.where(np.isinf(c), 0.0, c)[None]  # [L, N, M]
    s = np.where(np.isinf(c)[None], -np.inf, s)
    best = s.max(axis=2, keepdims=True)
    tie = s >= best - 1e-12 * np.maximum(1.0, np.abs(best))
    out = np.argmin(np.where(tie, c[None], np.inf), axis=2).astype(np.int32)
    return out[0] if np.ndim(cost_weights) == 0 else out


def _check_outcomes(quality, cost) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(quality, np.float64)
    c = np.asarray(cost, np.float64)
    if q.ndim != 2 or q.shape != c.shape:
        raise ValueError(f"quality and cost must both be [N, M], got {q.shape} and {c.shape}")
    return q, c


def points_for(chosen, quality, cost, ref: int, cost_weights=None, knob: str | None = "cost_weight"
               ) -> list[dict[str, Any]]:
    """Operating points of one method: totals of the chosen LLMs as % of LLM ``ref``'s totals.

    Args:
      chosen: [L, N] (or [N], one point) int model index per setting and query.
      quality, cost: [N, M] true outcomes of the test queries.
      ref: column of the reference LLM.
      cost_weights: [L] knob values, or None (each point's ``cost_weight`` is then None).
      knob: name of the knob; ``"cost_weight"`` fills ``cost_weight``, another name gets its own
        key and ``cost_weight`` is None.
    Returns: L dicts ``{"cost_weight", "cost_pct", "quality_pct"}`` (+ ``knob`` if not lambda).
    Raises ``ValueError`` if a chosen outcome is NaN (an unscored call) or an index is out of range.
    """
    q, c = _check_outcomes(quality, cost)
    ch = np.asarray(chosen)
    ch = ch[None] if ch.ndim == 1 else ch
    n, m = q.shape
    if ch.ndim != 2 or ch.shape[1] != n:
        raise ValueError(f"chosen must be [L, {n}], got {np.shape(chosen)}")
    if not np.issubdtype(ch.dtype, np.integer) or ch.min(initial=0) < 0 or ch.max(initial=0) >= m:
        raise ValueError(f"chosen must hold int model indices in [0, {m}), got {ch.dtype} "
                         f"in [{ch.min(initial=0)}, {ch.max(initial=0)}]")
    rows = np.arange(n)[None, :]
    cq, cc = q[rows, ch], c[rows, ch]  # [L, N]
    if np.isnan(cq).any() or np.isnan(cc).any():
        bad = np.argwhere(np.isnan(cq) | np.isnan(cc))[0]
        raise ValueError(f"{int((np.isnan(cq) | np.isnan(cc)).sum())} chosen outcomes are NaN "
                         f"(first: setting {bad[0]}, query {bad[1]}, model {ch[bad[0], bad[1]]}); "
                         "load the data with missing scores dropped, or mask those models")
    q_ref, c_ref = q[:, ref].sum(), c[:, ref].sum()
    if np.isnan(q_ref) or np.isnan(c_ref) or q_ref <= 0 or c_ref <= 0:
        raise ValueError(f"reference column {ref} must have positive, non-NaN totals "
                         f"(quality {q_ref!r}, cost {c_ref!r})")
    q_pct = 100.0 * cq.sum(axis=1) / q_ref
    c_pct = 100.0 * cc.sum(axis=1) / c_ref
    knobs = [None] * ch.shape[0] if cost_weights is None else list(np.atleast_1d(cost_weights))
    if len(knobs) != ch.shape[0]:
        raise ValueError(f"{len(knobs)} knob values for {ch.shape[0]} settings")
    pts = []
    for k, cp, qp in zip(knobs, c_pct, q_pct):
        k = None if k is None else float(k)
        p = {"cost_weight": k if knob == "cost_weight" else None,
             "cost_pct": float(cp), "quality_pct": float(qp)}
        if knob not in (None, "cost_weight"):
            p[knob] = k
        pts.append(p)
    return pts


MethodLike = Sweep | np.ndarray | Callable[[float], np.ndarray]


def _as_sweep(name: str, method: MethodLike, cost_weights: np.ndarray) -> Sweep:
    """A callable(cost_weight) -> [N] is run over ``cost_weights``; an [L, N] array is aligned
    with ``cost_weights``; an [N] array is one point."""
    if isinstance(method, Sweep):
        ch = np.asarray(method.chosen)
        return Sweep(ch[None] if ch.ndim == 1 else ch, method.knobs, method.knob)
    if callable(method):
        ch = np.stack([np.asarray(method(float(l))) for l in cost_weights])
        return Sweep(ch, list(cost_weights), "cost_weight")
    ch = np.asarray(method)
    if ch.ndim == 1:
        return Sweep(ch[None], None, None)
    if ch.ndim == 2 and ch.shape[0] == len(cost_weights):
        return Sweep(ch, list(cost_weights), "cost_weight")
    raise ValueError(f"method {name!r}: choices of shape {ch.shape} match neither [N] nor "
                     f"[{len(cost_weights)} cost weights, N]")


def budget_key(b: float) -> str:
    """The key of budget b (% of the reference's cost) in a report's best_*_at_cost_pct dicts."""
    return f"{b:g}"


def one_price(cost) -> bool:
    """Every LLM costs the same on every query (cost [N, M]): no routing choice changes the cost, so
    there is no cost-quality curve and no AIQ."""
    c = np.nan_to_num(np.asarray(cost, np.float64))
    return bool(np.all(np.abs(c - c[:, :1]) <= 1e-9 * max(np.abs(c).max(initial=0.0), 1e-30)))


def _summary(points: list[dict], c_max: float, budgets: Sequence[float], flat: bool = False) -> dict[str, Any]:
    costs = [p["cost_pct"] for p in points]
    quals = [p["quality_pct"] for p in points]
    best_q, best_p = {}, {}
    for b in budgets:
        i = metrics.best_point_under_cost(costs, quals, b)
        best_q[budget_key(b)] = None if i < 0 else quals[i]
        best_p[budget_key(b)] = None if i < 0 else points[i]
    return {"aiq": None if flat else metrics.aiq(costs, quals, c_max=c_max), "points": points,
            "best_quality_at_cost_pct": best_q, "best_point_at_cost_pct": best_p}


_EMPTY_TASK = {"aiq": None, "points": [], "best_quality_at_cost_pct": {}, "best_point_at_cost_pct": {}}


def evaluate(methods: Mapping[str, MethodLike], dataset, reference_name: str,
             cost_weights=None, budgets: Sequence[float] = (PAPER_BUDGET_PCT,)) -> dict[str, Any]:
    """Evaluate every method on ``dataset`` (the test queries) against ``reference_name``.

    Args:
      methods: name -> a :class:`Sweep`, a callable ``cost_weight -> chosen [N]`` (run over
        ``cost_weights``), chosen ``[L, N]`` aligned with ``cost_weights``, or chosen ``[N]`` (one
        point). Single LLMs are one-point methods (see :func:`single_llm_methods`).
      dataset: a :class:`mixllm_jax.data.Dataset` with ``quality``, ``cost`` [N, M], ``models``,
        ``tags``.
      reference_name: the model whose totals are 100% (e.g. ``gpt-4-1106-preview``).
      cost_weights: [L] lambda grid (default :data:`COST_WEIGHTS`).
      budgets: cost % limits for ``best_quality_at_cost_pct``.
    Returns: the report dict (schema in the module docstring).
    """
    cws = np.asarray(COST_WEIGHTS if cost_weights is None else cost_weights, np.float64)
    q, c = _check_outcomes(dataset.quality, dataset.cost)
    models = list(dataset.models)
    if reference_name not in models:
        raise ValueError(f"reference {reference_name!r} is not a model of the dataset: {models}")
    ref = models.index(reference_name)
    sweeps = {name: _as_sweep(name, m, cws) for name, m in methods.items()}
    pts = {name: points_for(s.chosen, q, c, ref, s.knobs, s.knob) for name, s in sweeps.items()}
    c_max = max(p["cost_pct"] for ps in pts.values() for p in ps)
    flat = one_price(c)

    keys = np.asarray(task_keys(dataset.tags), dtype=object)
    tasks = list(dict.fromkeys(keys.tolist()))
    task_pts: dict[str, dict[str, list]] = {}
    task_info = {}
    for t in tasks:
        rows = keys == t
        task_info[t] = {"n_queries": int(rows.sum())}
        if not (q[rows, ref].sum() > 0 and c[rows, ref].sum() > 0):
            task_info[t]["c_max_pct"] = None
            task_info[t]["note"] = "the reference's total quality or cost on this task is 0: no %"
            continue
        task_pts[t] = {name: points_for(s.chosen[:, rows], q[rows], c[rows], ref, s.knobs, s.knob)
                       for name, s in sweeps.items()}
        task_info[t]["c_max_pct"] = max(p["cost_pct"] for ps in task_pts[t].values() for p in ps)

    task_rows = [keys == t for t in tasks]
    out_methods = {}
    for name, s in sweeps.items():
        got = q[np.arange(q.shape[0]), s.chosen[0]]
        entry = {"kind": "single" if s.chosen.shape[0] == 1 and s.knob is None else "sweep",
                 "knob": s.knob,
                 "task_mean_quality": float(100 * np.mean([np.nanmean(got[r]) for r in task_rows]))}
        entry.update(_summary(pts[name], c_max, budgets, flat))
        entry["per_task"] = {t: _summary(task_pts[t][name], task_info[t]["c_max_pct"], budgets, flat)
                             if t in task_pts else _EMPTY_TASK for t in tasks}
        out_methods[name] = entry
    return {"reference": reference_name, "n_queries": int(q.shape[0]), "models": models,
            "c_max_pct": float(c_max), "flat_cost": flat, "budgets_pct": [float(b) for b in budgets],
            "cost_weights": [float(x) for x in cws], "tasks": task_info, "methods": out_methods}


def paired_bootstrap(chosen_a, chosen_b, dataset, reference_name: str, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Paired bootstrap over test queries of method a minus method b (each chosen [L, N] or [N]).

    Every resample draws N queries with replacement, shared by both methods, and recomputes both
    methods' AIQ (points as % of the reference on the resample, c_max shared by the two) and
    task-mean quality. Returns {"aiq" | "task_mean_quality": {"diff", "lo", "hi"}}: the difference
    on the full test set and its 95% percentile interval (AIQ: None when every LLM costs the same).
    """
    q = np.nan_to_num(np.asarray(dataset.quality, np.float64))
    c = np.asarray(dataset.cost, np.float64)
    ref = list(dataset.models).index(reference_name)
    keys = np.asarray(task_keys(dataset.tags), dtype=object)
    task_id = np.unique(keys, return_inverse=True)[1]
    n_tasks = task_id.max() + 1
    rows = np.arange(q.shape[0])
    per = []
    for ch in (chosen_a, chosen_b):
        ch = np.atleast_2d(np.asarray(ch))
        per.append((q[rows, ch], c[rows, ch]))  # [L, N] chosen quality and cost
    flat = one_price(c)  # no curve: no AIQ

    def stats(idx):
        qr, cr = q[idx, ref].sum(), c[idx, ref].sum()
        cost_pct = [100 * cq[1][:, idx].sum(1) / cr for cq in per]
        qual_pct = [100 * cq[0][:, idx].sum(1) / qr for cq in per]
        c_max = max(float(x.max()) for x in cost_pct)
        aiq_ = [np.nan if flat else metrics.aiq(cp, qp, c_max=c_max) for cp, qp in zip(cost_pct, qual_pct)]
        t, cnt = task_id[idx], np.bincount(task_id[idx], minlength=n_tasks)
        tmq = [100 * np.mean((np.bincount(t, cq[0][0, idx], n_tasks) / np.maximum(cnt, 1))[cnt > 0]) for cq in per]
        return aiq_[0] - aiq_[1], tmq[0] - tmq[1]

    full = stats(rows)
    rng = np.random.default_rng(seed)
    boot = np.array([stats(rng.integers(0, len(rows), len(rows))) for _ in range(n_boot)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {name: {k: None if flat and name == "aiq" else float(v[i]) for k, v in (("diff", full), ("lo", lo), ("hi", hi))}
            for i, name in enumerate(("aiq", "task_mean_quality"))}


def calibration(q_hat, quality, bins: int = 10) -> dict[str, Any]:
    """Predicted vs observed quality over every observed (query, LLM) pair: q_hat, quality [N, M].

    Returns {"ece": expected calibration error (bin-weighted mean |predicted - observed|),
    "bins": [{"lo", "hi", "n", "predicted", "observed"}]} over equal-width bins of [0, 1]
    (predictions clipped into it).
    """
    p, y = np.asarray(q_hat, np.float64), np.asarray(quality, np.float64)
    ok = np.isfinite(y) & np.isfinite(p)
    p, y = np.clip(p[ok], 0.0, 1.0), y[ok]
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        gap = abs(p[m].mean() - y[m].mean())
        ece += m.sum() / p.size * gap
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()),
                    "predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return {"ece": float(ece), "bins": out}


def single_llm_methods(models: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """Each LLM as a one-point method: ``{name: chosen [N] all equal to its column}``."""
    return {m: np.full(n, j, np.int32) for j, m in enumerate(models)}

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
"""

from __future__ import annotations

import json
import math
from pathlib import Path
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
    "plot_curves",
    "format_table",
    "format_task_table",
    "write_report",
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


def _budget_key(b: float) -> str:
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
        best_q[_budget_key(b)] = None if i < 0 else quals[i]
        best_p[_budget_key(b)] = None if i < 0 else points[i]
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


def plot_reliability(cal: Mapping[str, Any], path: str | Path) -> Path:
    """Reliability diagram of :func:`calibration`: observed vs predicted quality per bin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    b = cal["bins"]
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.plot([x["predicted"] for x in b], [x["observed"] for x in b], "o-")
    for x in b:
        ax.annotate(str(x["n"]), (x["predicted"], x["observed"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    ax.set_xlabel("predicted quality (bin mean)")
    ax.set_ylabel("observed quality (bin mean)")
    ax.set_title(f"Calibration, ECE {cal['ece']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def single_llm_methods(models: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """Each LLM as a one-point method: ``{name: chosen [N] all equal to its column}``."""
    return {m: np.full(n, j, np.int32) for j, m in enumerate(models)}


# ----------------------------------------------------------------------------------------------
# Tables, plot, files
# ----------------------------------------------------------------------------------------------


def _fmt(x, nd=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _order(report) -> list[str]:
    """Sweeps by AIQ (best first), then one-point methods (single LLMs) by quality."""
    ms = report["methods"]
    return sorted(ms, key=lambda n: (ms[n]["kind"] == "single", -(ms[n]["points"][0]["quality_pct"]
                                     if ms[n]["kind"] == "single" or ms[n]["aiq"] is None else ms[n]["aiq"])))


NO_AIQ = "—"  # a one-point method (a single LLM) has no curve: its AIQ is not shown


def format_table(report: Mapping[str, Any]) -> str:
    """Markdown table, best AIQ first: AIQ, best quality % at each budget (with its cost %),
    the top-quality point and the cheapest point of each method."""
    budgets = report.get("budgets_pct", [PAPER_BUDGET_PCT])
    head = ["method", "AIQ"]
    for b in budgets:
        head.append(f"quality% @ cost<={b:g}% (cost%)")
    head += ["top quality% (cost%)", "cheapest cost% (quality%)", "task-mean quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for name in _order(report):
        m = report["methods"][name]
        row = [name + (" (ref)" if name == report["reference"] else ""),
               NO_AIQ if m["kind"] == "single" or m["aiq"] is None else _fmt(m["aiq"])]
        for b in budgets:
            p = m["best_point_at_cost_pct"].get(_budget_key(b))
            row.append("-" if p is None else f"{p['quality_pct']:.2f} ({p['cost_pct']:.2f})")
        top = max(m["points"], key=lambda p: (p["quality_pct"], -p["cost_pct"]))
        low = min(m["points"], key=lambda p: (p["cost_pct"], -p["quality_pct"]))
        row.append(f"{top['quality_pct']:.2f} ({top['cost_pct']:.2f})")
        row.append(f"{low['cost_pct']:.2f} ({low['quality_pct']:.2f})")
        row.append(_fmt(m.get("task_mean_quality")))
        lines.append("| " + " | ".join(row) + " |")
    if report.get("flat_cost"):
        lines.append(f"\n{NO_AIQ}: every LLM costs the same on these queries, so no method has a cost-quality curve "
                     "and no AIQ: compare quality.")
    elif any(m["kind"] == "single" for m in report["methods"].values()):
        lines.append(f"\n{NO_AIQ}: one operating point (a single LLM) has no curve, so no AIQ; its quality "
                     "and cost are in the other columns.")
    return "\n".join(lines)


def format_task_table(report: Mapping[str, Any], methods_per_table: int = 6) -> str:
    """Markdown tables per task, one row per task (any number of tasks stays narrow), at most
    `methods_per_table` methods per table: each cell is the method's AIQ / best quality % at the
    first budget on that task's queries."""
    b = _budget_key(report.get("budgets_pct", [PAPER_BUDGET_PCT])[0])
    names = _order(report)
    out = [f"Each cell: AIQ / best quality % at cost <= {b}% on the task's queries, % of the reference "
           f"on that task ({NO_AIQ}: a single LLM has no AIQ)."]
    for i in range(0, len(names), methods_per_table):
        chunk = names[i:i + methods_per_table]
        lines = ["| task (queries) | " + " | ".join(chunk) + " |", "|" + "|".join([" --- "] * (len(chunk) + 1)) + "|"]
        for t, info in report["tasks"].items():
            cells = []
            for name in chunk:
                m = report["methods"][name]
                pt = m["per_task"][t]
                aiq = NO_AIQ if m["kind"] == "single" or report.get("flat_cost") else _fmt(pt["aiq"])
                cells.append(f"{aiq} / {_fmt(pt['best_quality_at_cost_pct'].get(b))}")
            lines.append(f"| {t} ({info['n_queries']}) | " + " | ".join(cells) + " |")
        out += ["", "\n".join(lines)]
    return "\n".join(out)


def compact(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without its per-task operating points (per task: AIQ and best quality at each
    budget only): what ``report.json`` holds unless the full report is asked for."""
    out = dict(report)
    out["methods"] = {name: {**m, "per_task": {t: {"aiq": pt["aiq"],
                                                     "best_quality_at_cost_pct": pt["best_quality_at_cost_pct"]}
                                                 for t, pt in m["per_task"].items()}}
                      for name, m in report["methods"].items()}
    return out


def format_bootstrap_table(boot: Mapping[str, Any]) -> str:
    """Markdown: mixllm minus each method, with the 95% paired-bootstrap interval."""
    lines = ["| mixllm minus | AIQ diff [95% CI] | task-mean quality diff [95% CI] |", "| --- | --- | --- |"]
    for name, b in boot.items():
        cell = lambda k: NO_AIQ if b[k]["diff"] is None else \
            f"{b[k]['diff']:+.2f} [{b[k]['lo']:+.2f}, {b[k]['hi']:+.2f}]"  # noqa: E731
        lines.append(f"| {name} | {cell('aiq')} | {cell('task_mean_quality')} |")
    return "\n".join(lines)


def format_budget_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each budget's target, realised cost % and quality %, and its mixture."""
    lines = ["| budget (% of ref cost) | realised cost % | quality % | cost weights (share at the 2nd) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        mix = f"{r['cost_weight']:.4g}" + (f", {r['mix_cost_weight']:.4g} ({100 * r['mix']:.1f}%)" if r["mix"] else "")
        lines.append(f"| {r['budget_pct']:g} | {r['cost_pct']:.2f} | {r['quality_pct']:.2f} | {mix} |")
    return "\n".join(lines)


def plot_curves(report: Mapping[str, Any], path: str | Path) -> Path:
    """PNG of every method's cost% - quality% points and non-decreasing hull (log cost axis),
    single LLMs as labelled points, the reference at (100, 100), a line at each budget."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6.5))
    sweeps = [n for n in _order(report) if report["methods"][n]["kind"] == "sweep"]
    singles = [n for n in report["methods"] if report["methods"][n]["kind"] == "single"]
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", "-.", ":"]
    for i, name in enumerate(sweeps):
        m = report["methods"][name]
        c = np.array([p["cost_pct"] for p in m["points"]])
        q = np.array([p["quality_pct"] for p in m["points"]])
        hc, hq = metrics.non_decreasing_convex_hull(c, q)
        # the hull is piecewise linear in cost: sample it densely so it stays exact on a log axis
        xs = np.geomspace(hc[0], max(report["c_max_pct"], hc[0] * 1.0001), 400)
        color = cmap(i % 10)
        ax.plot(xs, np.interp(xs, hc, hq), styles[i % 4], color=color, lw=2.4 - 0.25 * (i % 4),
                label=name if m["aiq"] is None else f"{name} (AIQ {m['aiq']:.1f})")
        ax.scatter(c, q, s=10, color=color, alpha=0.6)
    for name in singles:
        p = report["methods"][name]["points"][0]
        is_ref = name == report["reference"]
        ax.scatter([p["cost_pct"]], [p["quality_pct"]], marker="*" if is_ref else "o",
                   s=120 if is_ref else 30, color="black" if is_ref else "gray", zorder=3)
        ax.annotate(name.split("/")[-1], (p["cost_pct"], p["quality_pct"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    for b in report.get("budgets_pct", []):
        ax.axvline(b, color="red", lw=1, ls=":")
        ax.text(b, ax.get_ylim()[0], f" {b:g}%", color="red", fontsize=8, va="bottom")
    ax.axhline(100.0, color="black", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"cost, % of {report['reference']} (log scale)")
    ax.set_ylabel(f"quality, % of {report['reference']}")
    ax.set_title(f"Quality vs cost on {report['n_queries']} test queries "
                 "(lines: non-decreasing convex hull)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="sweeps")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Mapping[str, Any], out_dir: str | Path, full: bool = False) -> dict[str, Path]:
    """Write ``report.json`` (:func:`compact` unless `full`: then every per-task point too),
    ``report.md`` (main and per-task tables) and ``curves.png``.

    Returns: ``{"json": path, "md": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "curves.png"}
    paths["json"].write_text(json.dumps(report if full else compact(report), indent=1, allow_nan=False) + "\n")
    md = [f"# Routing report: {report['n_queries']} queries, reference {report['reference']}", "",
          f"Quality and cost are % of {report['reference']}'s totals on the same queries. AIQ: "
          f"mean of the non-decreasing convex hull over cost 0..{report['c_max_pct']:.2f}% "
          "(the largest cost of any point, shared by all methods; RouterBench's definition). "
          "`quality% @ cost<=B%`: the best point actually run within the budget.", "",
          format_table(report), "", "task-mean quality: mean over tasks of each task's mean quality "
          "(x 100) at a method's first point (cost weight 0 for a router).", ""]
    if "policy" in report:
        p = report["policy"]
        md += [f"Saved operating point (`mixllm@budget`): budget {p['budget']}, cost weight "
               f"{p['cost_weight']:.4g}, {100 * p['mix']:.1f}% of queries at {p['mix_cost_weight']:.4g}.", ""]
    if report.get("bootstrap"):
        md += ["## Paired bootstrap (1,000 resamples of the test queries)", "",
               format_bootstrap_table(report["bootstrap"]), ""]
    if "budgets" in report:
        md += ["## Budgets met on the held-out curve", "", format_budget_table(report["budgets"]), ""]
    if "calibration" in report:
        paths["reliability"] = plot_reliability(report["calibration"], out / "reliability.png")
        md += [f"Calibration of predicted quality: ECE {report['calibration']['ece']:.4f} "
               "![reliability](reliability.png)", ""]
    md += ["## Per task", "", format_task_table(report), "", "![curves](curves.png)", ""]
    paths["md"].write_text("\n".join(md))
    plot_curves(report, paths["png"])
    return paths

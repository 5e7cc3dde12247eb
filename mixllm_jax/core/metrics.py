"""Quality-cost metrics (pure numpy): totals, % of a reference, RouterBench's AIQ, budget points.

A *sweep* is a set of operating points of one method, e.g. one per cost weight lambda:
``costs [P]`` and ``qualities [P]`` (totals, means or % of a reference; any units, but the same
units for every method compared).

The non-decreasing convex hull R~(c) of a sweep (RouterBench, Hu et al. 2024) is the best quality
reachable at a cost budget c by randomly mixing the sweep's points (a router may pick point a with
probability w and point b otherwise): the upper concave envelope of the points up to the best
quality, flat after it. It is undefined (taken as 0 for AIQ) below the cheapest point.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "totals",
    "pct_of_reference",
    "non_decreasing_convex_hull",
    "hull_quality_at_cost",
    "aiq",
    "best_point_under_cost",
    "best_quality_under_cost",
]


def _points(costs, qualities) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs, np.float64).reshape(-1)
    q = np.asarray(qualities, np.float64).reshape(-1)
    if c.shape != q.shape:
        raise ValueError(f"costs and qualities differ in length: {c.size} vs {q.size}")
    if c.size == 0:
        raise ValueError("need at least one (cost, quality) point")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(q))):
        raise ValueError("costs and qualities must be finite (found NaN or inf)")
    if np.any(c < 0):
        raise ValueError(f"costs must be >= 0, found {c.min()!r}")
    return c, q


def totals(chosen_quality, chosen_cost) -> tuple[float, float]:
    """Sum of quality and of cost over the queries: ``chosen_quality [N]``, ``chosen_cost [N]``.

    Raises ``ValueError`` on NaN (decide first what a missing outcome is worth).
    """
    q = np.asarray(chosen_quality, np.float64)
    c = np.asarray(chosen_cost, np.float64)
    if q.shape != c.shape:
        raise ValueError(f"chosen_quality and chosen_cost differ in shape: {q.shape} vs {c.shape}")
    if np.isnan(q).any() or np.isnan(c).any():
        raise ValueError(f"NaN in chosen_quality ({int(np.isnan(q).sum())}) or chosen_cost "
                         f"({int(np.isnan(c).sum())})")
    return float(q.sum()), float(c.sum())


def pct_of_reference(values, reference_values) -> float:
    """``100 * sum(values) / sum(reference_values)`` (e.g. quality or cost as % of GPT-4's)."""
    v = float(np.sum(np.asarray(values, np.float64)))
    r = float(np.sum(np.asarray(reference_values, np.float64)))
    if not np.isfinite(v) or not np.isfinite(r):
        raise ValueError(f"pct_of_reference: non-finite sum (values {v!r}, reference {r!r})")
    if r == 0:
        raise ValueError("pct_of_reference: the reference sums to 0")
    return 100.0 * v / r


def non_decreasing_convex_hull(costs, qualities) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the non-decreasing convex hull of a sweep, sorted by cost.

    Args: costs [P], qualities [P] (any order; equal costs keep the best quality).
    Returns: hull_costs [H], hull_qualities [H], H <= P, both strictly increasing except a single
    point. Points after the best quality (costlier, no better) and points under the upper
    concave envelope are dropped; collinear middle points are dropped too.
    """
    c, q = _points(costs, qualities)
    order = np.lexsort((-q, c))  # by cost, best quality first among equal costs
    c, q = c[order], q[order]
    keep = np.ones(c.size, bool)
    keep[1:] = c[1:] != c[:-1]
    c, q = c[keep], q[keep]
    top = int(np.argmax(q))  # first (cheapest) point of the best quality
    c, q = c[: top + 1], q[: top + 1]
    hull: list[int] = []
    for i in range(c.size):  # monotone chain, upper hull, left to right
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (c[b] - c[a]) * (q[i] - q[a]) - (q[b] - q[a]) * (c[i] - c[a])
            if cross >= 0:  # b is under or on the chord a-i
                hull.pop()
            else:
                break
        hull.append(i)
    idx = np.array(hull)
    return c[idx], q[idx]


def hull_quality_at_cost(costs, qualities, budget) -> float:
    """R~(budget): the hull-interpolated quality at cost ``budget``; NaN below the cheapest point.

    This is what a random mix of the sweep's points achieves in expectation, not a point that any
    single setting achieved; for that see :func:`best_quality_under_cost`.
    """
    hc, hq = non_decreasing_convex_hull(costs, qualities)
    if budget < hc[0]:
        return float("nan")
    return float(np.interp(budget, hc, hq))  # flat (= best quality) past the last vertex


def aiq(costs, qualities, c_max: float | None = None, c_min: float = 0.0) -> float:
    """RouterBench's AIQ: the mean of the non-decreasing convex hull R~ over [c_min, c_max].

    ``AIQ = 1 / (c_max - c_min) * integral_{c_min}^{c_max} R~(c) dc``, with R~ = 0 below the sweep's
    cheapest point and R~ = best quality beyond its costliest hull point.

    The defaults follow RouterBench's code (``evaluation/AIQ.py``: trapezoid area under the hull,
    extended flat to the largest cost, divided by that largest cost): ``c_min = 0`` and ``c_max`` =
    the largest cost of this sweep. To compare methods, pass the same ``c_max`` to all of them, the
    largest cost over every method compared, as RouterBench does; otherwise a single point scores 0.
    The paper's formula with ``c_min`` = the smallest cost compared is ``aiq(..., c_min=...)``.

    Args: costs [P], qualities [P] in any order.
    Returns: AIQ in the units of ``qualities``.
    """
    hc, hq = non_decreasing_convex_hull(costs, qualities)
    hi = float(np.max(np.asarray(costs, np.float64))) if c_max is None else float(c_max)
    lo = float(c_min)
    if not hi > lo:
        raise ValueError(f"aiq needs c_max > c_min, got c_max={hi!r}, c_min={lo!r}")
    start = max(lo, hc[0])  # R~ = 0 below the cheapest point
    if hi <= start:
        return 0.0
    xs = np.concatenate([[start], hc[(hc > start) & (hc < hi)], [hi]])
    ys = np.interp(xs, hc, hq)
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / (hi - lo)


def best_point_under_cost(costs, qualities, max_cost: float) -> int:
    """Index of the best actually achieved point with ``cost <= max_cost`` (cheapest among equal
    qualities), or -1 if none. No interpolation: the point is a setting that was run."""
    c, q = _points(costs, qualities)
    ok = np.flatnonzero(c <= max_cost)
    if ok.size == 0:
        return -1
    best = np.max(q[ok])
    cand = ok[q[ok] == best]
    return int(cand[np.argmin(c[cand])])


def best_quality_under_cost(costs, qualities, max_cost: float) -> float:
    """Best quality among the achieved points with ``cost <= max_cost`` (NaN if none).

    Not interpolated on the hull (see :func:`hull_quality_at_cost` for that).
    """
    i = best_point_under_cost(costs, qualities, max_cost)
    return float("nan") if i < 0 else float(np.asarray(qualities, np.float64).reshape(-1)[i])

"""Budgets, exactly: a held-out cost-quality curve turns any budget into a policy.

Training holds out part of train, sweeps the cost weight lambda over a fine grid there and keeps
each setting's realised mean spend (USD per query) and mean quality: the `OperatingCurve`. A budget
between two settings on the curve's non-decreasing convex hull is met by a randomised mixture of
them (`Policy.mix`): a query takes the costlier setting with probability p, so the expected spend
is the budget (the hull, not the steps). See docs/architecture.md, "Budgets".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixllm_jax.core import metrics
from mixllm_jax.core.config import Budget
from mixllm_jax.core.policy import Policy

CALIBRATION_GRID: np.ndarray = np.concatenate([[0.0], np.logspace(-1, 7, 161)])
"""lambda grid (quality per USD) of the held-out sweep: 20 points per decade."""


@dataclasses.dataclass(frozen=True)
class OperatingCurve:
    """A router's held-out sweep. cost_weights, spend (mean USD per query), quality (mean): [L].

    reference_spend: each LLM's mean USD per query on the same held-out queries (share budgets).
    """

    cost_weights: tuple[float, ...]
    spend: tuple[float, ...]
    quality: tuple[float, ...]
    reference_spend: dict
    n_queries: int

    def target_usd(self, budget: Budget) -> float:
        """The budget as mean USD per query (not for cost_weight budgets)."""
        if budget.kind == "usd":
            return budget.value
        ref = budget.reference or max(self.reference_spend, key=self.reference_spend.get)
        if ref not in self.reference_spend:
            raise ValueError(f"budget reference {ref!r} is not an LLM of this router: "
                             f"{sorted(self.reference_spend)}")
        return budget.value * self.reference_spend[ref]

    def policy(self, budget: Budget, base: Policy = Policy()) -> Policy:
        """`base` with the cost weight(s) and mixture that meet `budget` on this curve."""
        if budget.kind == "cost_weight":
            return base.replace(cost_weight=float(budget.value), mix_cost_weight=0.0, mix=0.0)
        lo, hi, p = mixture(np.asarray(self.cost_weights), np.asarray(self.spend),
                            np.asarray(self.quality), self.target_usd(budget))
        return base.replace(cost_weight=lo, mix_cost_weight=hi, mix=p)

    def score(self, points: int = 50) -> float:
        """Mean quality of the curve's hull over its spend range (a normalised AIQ), or its best
        quality when spend does not vary (LLMs of one price): higher is better."""
        spend, quality = np.asarray(self.spend), np.asarray(self.quality)
        hc, hq = metrics.non_decreasing_convex_hull(spend, quality)
        if spend.max() - spend.min() <= 1e-9 * max(spend.max(), 1e-30):
            return float(hq.max())
        grid = np.linspace(spend.min(), spend.max(), points)
        return float(np.interp(grid, hc, hq, left=hq[0]).mean())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OperatingCurve":
        return cls(tuple(map(float, d["cost_weights"])), tuple(map(float, d["spend"])),
                   tuple(map(float, d["quality"])), {str(k): float(v) for k, v in d["reference_spend"].items()},
                   int(d["n_queries"]))


def mixture(cost_weights: np.ndarray, spend: np.ndarray, quality: np.ndarray, target: float
            ) -> tuple[float, float, float]:
    """(lambda_cheap, lambda_dear, p): the two hull vertices around `target` spend and the share p of
    queries sent to the dearer one so that the expected spend is `target`.

    Outside the hull's spend range the nearest end vertex is returned with p = 0.
    """
    hc, hq = metrics.non_decreasing_convex_hull(spend, quality)
    # a hull vertex's setting: the largest lambda (cheapest choice) that reached that point
    idx = [int(np.flatnonzero((spend == c) & (quality == q))[-1]) for c, q in zip(hc, hq)]
    if target <= hc[0]:
        return float(cost_weights[idx[0]]), 0.0, 0.0
    if target >= hc[-1]:
        return float(cost_weights[idx[-1]]), 0.0, 0.0
    j = int(np.searchsorted(hc, target))  # hc[j-1] < target <= hc[j]
    p = (target - hc[j - 1]) / (hc[j] - hc[j - 1])
    return float(cost_weights[idx[j - 1]]), float(cost_weights[idx[j]]), float(p)


def curve_from_choices(chosen: np.ndarray, cost_weights, quality: np.ndarray, cost: np.ndarray,
                       models) -> OperatingCurve:
    """An OperatingCurve from held-out choices [L, N] (model columns) and true outcomes [N, M]."""
    rows = np.arange(chosen.shape[1])[None]
    q = np.nan_to_num(quality[rows, chosen]).mean(1)
    c = cost[rows, chosen].mean(1)
    ref = {m: float(np.mean(cost[:, j])) for j, m in enumerate(models)}
    return OperatingCurve(tuple(map(float, cost_weights)), tuple(map(float, c)), tuple(map(float, q)),
                          ref, int(chosen.shape[1]))

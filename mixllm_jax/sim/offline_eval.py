"""Offline (no-load) evaluation of a router state in the simulator's experiments: the choices at
each cost weight ignoring load ("unconstrained" quality), their points as % of the reference's
logged totals, and the cost weight that meets a cost share (calibration)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mixllm_jax.core import engine
from mixllm_jax.core.policy import Policy
from mixllm_jax.core.state import ArmRegistry, RouterState
from mixllm_jax.data import Dataset
from mixllm_jax.offline.evaluate import choose_by_score
from mixllm_jax.sim.simulate import REFERENCE



def offline_choices(state: RouterState, registry: ArmRegistry, x: np.ndarray, prompt_tokens: np.ndarray,
                    models: Sequence[str], cost_weights: Sequence[float], alpha: float = 0.01,
                    bonus: np.ndarray | None = None) -> np.ndarray:
    """Model columns [L, N] the router picks for x [N, d] at each cost weight, ignoring load
    (beta = 0): one jitted prediction pass, then evaluate.choose_by_score on q + alpha u (+ bonus)
    and c over the registered, active LLMs."""
    d = engine.route(state, x, prompt_tokens, Policy(cost_weight=0.0, alpha=0.0, beta=0.0, in_batch_load=False))
    q, c, u = (np.asarray(getattr(d, k), np.float64) for k in ("quality", "cost", "uncertainty"))
    base = q + alpha * u + (0.0 if bonus is None else np.asarray(bonus, np.float64))
    unknown = [n for n in registry.slots if n not in models]
    if unknown:
        raise ValueError(f"registered LLMs {unknown} are not models of the data")
    active = np.asarray(state.active)
    q_cols = np.full((len(x), len(models)), np.nan)
    c_cols = np.full((len(x), len(models)), np.nan)
    for j, name in enumerate(models):
        slot = registry.slots.get(name)
        if slot is not None and active[slot]:
            q_cols[:, j], c_cols[:, j] = base[:, slot], c[:, slot]
    return choose_by_score(q_cols, c_cols, np.asarray(cost_weights, np.float64)).astype(np.int64)


def points(chosen: np.ndarray, dataset: Dataset, reference: str = REFERENCE) -> list[dict]:
    """(cost %, quality %) of the reference's logged totals for choices [L, N]."""
    ref = dataset.models.index(reference)
    rows = np.arange(len(dataset))[None, :]
    quality, cost = dataset.quality.astype(np.float64), dataset.cost.astype(np.float64)
    q, c = quality[rows, chosen].sum(1), cost[rows, chosen].sum(1)
    return [{"cost_pct": float(100 * cc / cost[:, ref].sum()),
             "quality_pct": float(100 * qq / quality[:, ref].sum())} for qq, cc in zip(q, c)]


def calibrate_cost_weight(pts: list[dict], cost_weights: Sequence[float], target_cost_pct: float) -> float:
    """The smallest cost weight of the grid whose cost % is at most the target (else the largest)."""
    for lam, p in zip(cost_weights, pts):
        if p["cost_pct"] <= target_cost_pct:
            return float(lam)
    return float(cost_weights[-1])

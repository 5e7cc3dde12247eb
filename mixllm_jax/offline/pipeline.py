"""End-to-end jobs: evaluate a router beside the baselines, the main RouterBench job, ablations."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax.offline import baselines, evaluate, report as report_mod, train
from mixllm_jax.core import budget as budget_mod, engine
from mixllm_jax.core.config import Budget, FinetuneConfig, HeadConfig, RouterConfig
from mixllm_jax.data import Dataset
from mixllm_jax.core.policy import Policy
from mixllm_jax.text.router import Router

REFERENCE = "gpt-4-1106-preview"
TABLE2_COST_LEVELS = (10.0, 15.0, 20.0, 24.18, 30.0, 50.0)  # cost % of the reference


def router_sweep(router: Router, e: np.ndarray, dataset: Dataset, cost_weights: Sequence[float],
                 route=engine.route) -> evaluate.Sweep:
    """Choices [L, N] (as dataset model indices) of `router` on embeddings e [N, H] over a lambda grid.

    Offline evaluation: no latency penalty or exploration, recorded prompt tokens. route: as
    `engine.route` (mesh.route on a mesh).
    """
    return evaluate.Sweep(train.sweep_choices(router, e, dataset, cost_weights, route),
                          list(map(float, cost_weights)), "cost_weight")


BOOTSTRAP_AGAINST = ("per_task_best", "mlp", "ridge", "knn", "compare")  # mixllm minus each, paired over test queries
BUDGET_LEVELS_PCT = (5.0, 10.0, 15.0, 20.0, 24.18, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0)


def compare_sweep(other: Router, dataset: Dataset, cost_weights: Sequence[float] | None = None,
                  cache_dir=None) -> evaluate.Sweep:
    """Another router's lambda sweep on `dataset`, on its own encoder's embeddings (`eval --compare`)."""
    cws = budget_mod.CALIBRATION_GRID if cost_weights is None else np.asarray(cost_weights, np.float64)
    e = train.embed(other.encoder, dataset, other.max_length, other.truncation_side, cache_dir, progress=False)
    return router_sweep(other, e, dataset, cws)


def budget_hits(router: Router, e: np.ndarray, dataset: Dataset, reference: str,
                levels_pct: Sequence[float] = BUDGET_LEVELS_PCT, route=engine.route) -> list[dict]:
    """Each budget (% of the reference's cost) met on the router's curve and run on `dataset`:
    target, realised cost % and quality % of the reference, and the policy's mixture."""
    q, c = dataset.quality, dataset.cost
    ref = list(dataset.models).index(reference)
    rows = []
    for level in levels_pct:
        pol = router.policy_for(Budget("share", level / 100.0, reference))
        ch = train.policy_choices(router, e, dataset, pol, route)
        got = np.arange(len(ch))
        rows.append({"budget_pct": float(level), "cost_pct": float(100 * c[got, ch].sum() / c[:, ref].sum()),
                     "quality_pct": float(100 * np.nansum(q[got, ch]) / np.nansum(q[:, ref])),
                     "cost_weight": pol.cost_weight, "mix_cost_weight": pol.mix_cost_weight, "mix": pol.mix})
    return rows


def budget_sweep(router: Router, e: np.ndarray, dataset: Dataset, reference: str,
                 levels_pct: Sequence[float], route=engine.route) -> evaluate.Sweep:
    """Choices [B, N] of the router's policy at each budget (% of the reference's cost), each met on
    its held-out curve (a mixture of two cost weights): a sweep whose knob is ``budget_pct``."""
    ch = [train.policy_choices(router, e, dataset, router.policy_for(Budget("share", b / 100.0, reference)), route)
          for b in levels_pct]
    return evaluate.Sweep(np.stack(ch), [float(b) for b in levels_pct], "budget_pct")


def evaluate_router(router: Router, train_ds: Dataset | None, test_ds: Dataset, reference: str = REFERENCE,
                    with_baselines: bool = True, cache_dir=None, progress: bool = True,
                    extra: dict | None = None, cost_weights: Sequence[float] | None = None,
                    budgets_pct: Sequence[float] | None = None, embed=None,
                    route=engine.route) -> dict:
    """The report of `router` beside the baselines fitted on train_ds, on the same embeddings and test
    split: its lambda sweep (`mixllm`, over `cost_weights`, default budget.CALIBRATION_GRID), its
    saved operating point (`mixllm@budget`), budgets met on its curve (`budgets`; with `budgets_pct`
    those levels, also as the sweep `mixllm@budgets` and the report's budget columns), and the
    calibration of its quality predictions (`calibration`).

    embed (dataset -> [N, H]) and route (as engine.route) replace the defaults (distributed.py:
    the encoder's batches over devices and processes, the routing on a mesh)."""
    from mixllm_jax.util import progress as progress_mod

    step = progress_mod.step if progress else (lambda desc: contextlib.nullcontext())
    emb = embed or (lambda ds: train.embed(router.encoder, ds, router.max_length, router.truncation_side,
                                           cache_dir, progress))
    e_test = emb(test_ds)
    cws = budget_mod.CALIBRATION_GRID if cost_weights is None else np.asarray(cost_weights, np.float64)
    with step(f"routing the test queries at {len(cws)} cost weights"):
        methods = {"mixllm": router_sweep(router, e_test, test_ds, cws, route),
                   "mixllm@budget": evaluate.Sweep(train.policy_choices(router, e_test, test_ds, router.policy,
                                                                        route),
                                                   None, None)}
        if budgets_pct is not None and router.curve is not None:
            methods["mixllm@budgets"] = budget_sweep(router, e_test, test_ds, reference, budgets_pct, route)
    methods.update(extra or {})
    if with_baselines:
        e_train = emb(train_ds)
        with step("fitting and running the baselines"):
            methods.update(baselines.run_baselines(e_train, train_ds, e_test, test_ds, cws))
    else:
        methods.update(evaluate.single_llm_methods(test_ds.models, len(test_ds)))
    kw = {} if budgets_pct is None else {"budgets": tuple(float(b) for b in budgets_pct)}
    report = evaluate.evaluate(methods, test_ds, reference, cost_weights=cws, **kw)
    against = [name for name in BOOTSTRAP_AGAINST if name in methods]
    report["bootstrap"] = {name: evaluate.paired_bootstrap(methods["mixllm"].chosen, methods[name].chosen, test_ds,
                                                           reference)
                           for name in (progress_mod.bar(against, desc="bootstrap", unit="method", leave=False)
                                        if progress else against)}
    q_hat, _, _ = train.predictions(router, e_test, test_ds.prompt_tokens, test_ds.models, route)
    report["calibration"] = evaluate.calibration(q_hat, test_ds.quality)
    report["policy"] = {"budget": router.config.budget.describe(), "cost_weight": router.policy.cost_weight,
                        "mix_cost_weight": router.policy.mix_cost_weight, "mix": router.policy.mix}
    if router.curve is not None:
        report["budgets"] = budget_hits(router, e_test, test_ds, reference,
                                        BUDGET_LEVELS_PCT if budgets_pct is None else budgets_pct, route=route)
    return report


def quality_at_cost_levels(report: dict, levels: Sequence[float] = TABLE2_COST_LEVELS) -> str:
    """Markdown: AIQ and best quality % of each sweep method at cost % <= each level (Table 2's shape)."""
    from mixllm_jax.core import metrics

    rows = ["| method | AIQ | task-mean quality | " + " | ".join(f"cost <= {l:g}%" for l in levels) + " |",
            "| --- | --- | --- |" + " --- |" * len(levels)]
    for name, m in report["methods"].items():
        if m["kind"] != "sweep":
            continue
        c = [p["cost_pct"] for p in m["points"]]
        q = [p["quality_pct"] for p in m["points"]]
        cells = [metrics.best_quality_under_cost(c, q, l) for l in levels]
        rows.append(f"| {name} | {report_mod.NO_AIQ if m['aiq'] is None else format(m['aiq'], '.2f')} | {m['task_mean_quality']:.2f} | " + " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in cells) + " |")
    return "\n".join(rows)


ABLATIONS = {
    "features": {"raw+domain": {}, "soft-domain": {"features": "soft-domain"}, "head": {"features": "head"},
                 "head-no-tag-loss": {"features": "head", "head": HeadConfig(tag_weight=0.0)},
                 "raw": {"features": "raw", "head": None}},
    "domains": {"tags": {}, "kmeans-20": {"domains": 20}, "kmeans-8": {"domains": 8}},
    "ridge": {"validation": {}, "evidence": {"ridge_selection": "evidence"}, "fixed-1": {"ridges": (1.0,)},
              "fixed-30": {"ridges": (30.0,)}, "free-domains": {"domain_precisions": (0.1,)}},
    "truncation": {"left": {}, "right": {"truncation_side": "right"}},
    "finetune": {"base": {"finetune": None}, "lora": {"finetune": FinetuneConfig()},
                 "top": {"finetune": FinetuneConfig(method="top", learning_rate=1e-4)}},
}


def ablation(kind: str, train_ds: Dataset, specs, encoder, out: Path, reference: str = REFERENCE,
             config: RouterConfig = RouterConfig(), val_frac: float = 0.2, cache_dir=None,
             progress: bool = True) -> dict:
    """Train variants of `config` on part of train and evaluate them on the rest (validation: the
    test split is never used to choose). kinds: see ABLATIONS. Writes the report to `out`."""
    if kind not in ABLATIONS:
        raise ValueError(f"ablation kind must be one of {sorted(ABLATIONS)}, got {kind!r}")
    perm = np.random.default_rng(1).permutation(len(train_ds))
    n_val = int(val_frac * len(train_ds))
    fit_ds, val_ds = train_ds.select(perm[n_val:]), train_ds.select(perm[:n_val])
    methods = {}
    for name, kw in ABLATIONS[kind].items():
        cfg = config.replace(**kw)
        router = train.train_router(fit_ds, specs, encoder, cfg, cache_dir=cache_dir, progress=progress)
        e_val = train.embed(router.encoder, val_ds, cfg.max_length, cfg.truncation_side, cache_dir, progress)
        methods[f"mixllm_{name}"] = router_sweep(router, e_val, val_ds, budget_mod.CALIBRATION_GRID)
    e_fit = train.embed(encoder, fit_ds, config.max_length, config.truncation_side, cache_dir, progress)
    e_val = train.embed(encoder, val_ds, config.max_length, config.truncation_side, cache_dir, progress)
    methods.update(baselines.run_baselines(e_fit, fit_ds, e_val, val_ds, budget_mod.CALIBRATION_GRID,
                                           include=("per_task_best", "mlp")))
    report = evaluate.evaluate(methods, val_ds, reference, cost_weights=budget_mod.CALIBRATION_GRID)
    report_mod.write_report(report, out)
    table = quality_at_cost_levels(report)
    (Path(out) / "cost_levels.md").write_text(table + "\n")
    report["cost_levels_table"] = table
    return report

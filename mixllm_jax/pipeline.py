"""End-to-end jobs: evaluate a router beside the baselines, the main RouterBench job, ablations."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax import baselines, engine, evaluate, tags, train
from mixllm_jax.data import Dataset
from mixllm_jax.policy import Policy
from mixllm_jax.router import Router

REFERENCE = "gpt-4-1106-preview"
TABLE2_COST_LEVELS = (10.0, 15.0, 20.0, 24.18, 30.0, 50.0)  # cost % of the reference


def router_sweep(router: Router, e: np.ndarray, dataset: Dataset, cost_weights: Sequence[float],
                 alpha: float | None = None, route=None) -> evaluate.Sweep:
    """Choices [L, N] (as dataset model indices) of `router` on embeddings e [N, H] over a lambda grid.

    Offline evaluation: no latency penalty, recorded prompt tokens; alpha defaults to the router's.
    route: a replacement for `engine.route` with its signature (e.g. the sharded one of mesh.py).
    """
    route = route or engine.route
    x = np.asarray(router.embed_features(e))
    slot_to_model = np.full(router.state.capacity, -1)
    for j, m in enumerate(dataset.models):
        slot_to_model[router.registry.slot(m)] = j
    alpha = router.policy.alpha if alpha is None else alpha
    chosen = []
    for cw in cost_weights:
        pol = Policy(cost_weight=float(cw), alpha=alpha, beta=0.0, in_batch_load=False)
        chosen.append(slot_to_model[np.asarray(route(router.state, x, dataset.prompt_tokens, pol).arm)])
    return evaluate.Sweep(np.stack(chosen), list(map(float, cost_weights)), "cost_weight")


def evaluate_router(router: Router, train_ds: Dataset, test_ds: Dataset, reference: str = REFERENCE,
                    with_baselines: bool = True, cache_dir=None, progress: bool = True,
                    extra: dict | None = None, embed=None, route=None) -> dict:
    """The report of `router` (as `mixllm`, and `mixllm_no_exploration` with alpha = 0) beside the
    baselines fitted on train_ds, all on the same embeddings and test split.

    embed (dataset -> [N, H]) and route (as engine.route) replace the defaults (distributed.py)."""
    emb = embed or (lambda ds: train.embed(router.encoder, ds, router.max_length, router.truncation_side,
                                           cache_dir, progress))
    e_test = emb(test_ds)
    cws = evaluate.COST_WEIGHTS
    methods = {"mixllm": router_sweep(router, e_test, test_ds, cws, route=route),
               "mixllm_no_exploration": router_sweep(router, e_test, test_ds, cws, alpha=0.0, route=route)}
    methods.update(extra or {})
    if with_baselines:
        methods.update(baselines.run_baselines(emb(train_ds), train_ds, e_test, test_ds, cws))
    return evaluate.evaluate(methods, test_ds, reference)


def quality_at_cost_levels(report: dict, levels: Sequence[float] = TABLE2_COST_LEVELS) -> str:
    """Markdown: AIQ and best quality % of each sweep method at cost % <= each level (Table 2's shape)."""
    from mixllm_jax import metrics

    rows = ["| method | AIQ | " + " | ".join(f"cost <= {l:g}%" for l in levels) + " |",
            "| --- | --- |" + " --- |" * len(levels)]
    for name, m in report["methods"].items():
        if m["kind"] != "sweep":
            continue
        c = [p["cost_pct"] for p in m["points"]]
        q = [p["quality_pct"] for p in m["points"]]
        cells = [metrics.best_quality_under_cost(c, q, l) for l in levels]
        rows.append(f"| {name} | {m['aiq']:.2f} | " + " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in cells) + " |")
    return "\n".join(rows)


def ablation(kind: str, train_ds: Dataset, test_ds: Dataset, specs, encoder, out: Path,
             max_length: int = 128, cache_dir=None, progress: bool = True) -> dict:
    """Train variants and evaluate them side by side.

    kind "head": tag-enhanced embedding (raw + domain) vs the head's features (with and without the
      tag losses) vs the raw embedding;
    kind "truncation": left vs right truncation of long prompts (both with the head).
    """
    if kind == "head":
        variants = {"mixllm_tag_enhanced": dict(feature_mode="raw+domain"),
                    "mixllm_head_features": dict(feature_mode="head"),
                    "mixllm_head_features_no_tag_loss": dict(feature_mode="head",
                                                             head_config=tags.HeadConfig(tag_weight=0.0)),
                    "mixllm_raw_embedding": dict(feature_mode="raw", head_config=None)}
    elif kind == "truncation":
        variants = {"mixllm_left_truncation": dict(truncation_side="left"),
                    "mixllm_right_truncation": dict(truncation_side="right")}
    else:
        raise ValueError(f"ablation kind must be 'head' or 'truncation', got {kind!r}")
    methods = {}
    for name, kw in variants.items():
        kw = {"max_length": max_length, **kw}
        router = train.train_router(train_ds, specs, encoder, cache_dir=cache_dir, progress=progress, **kw)
        e_test = train.embed(encoder, test_ds, router.max_length, router.truncation_side, cache_dir, progress)
        methods[name] = router_sweep(router, e_test, test_ds, evaluate.COST_WEIGHTS)
    report = evaluate.evaluate(methods, test_ds, REFERENCE)
    evaluate.write_report(report, out)
    table = quality_at_cost_levels(report)
    (Path(out) / "cost_levels.md").write_text(table + "\n")
    report["cost_levels_table"] = table
    return report

"""Out of domain: a router trained without a task streams that task's queries (learning online) and is
compared with the in-domain router at the same cost."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from mixllm_jax import evaluate, feedback, simulate as sim
from mixllm_jax.experiments import plots
from mixllm_jax.experiments.common import (BUDGET_PCT, PAPER_OOD, REFERENCE, STREAM_ALPHA, STREAM_BETA, STREAM_TAU,
                                           ExperimentData, best_under, calibrate, config_dict, fit_offline, fmt,
                                           hull_at, point_at, rel_pct, router_features, stream_policy, sweep,
                                           write_outputs)


def run_ood(d: ExperimentData, out_dir, *, tasks: Sequence[str] | None = None,
            modes: Sequence[str] = sim.LEARNING_MODES, config: sim.StreamConfig = sim.StreamConfig(),
            budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA, tau: float = STREAM_TAU,
            alpha: float = STREAM_ALPHA, seed: int = 0, n_windows: int = 20, progress: bool = True) -> dict:
    """For each held-out task T: a router trained on the other tasks' train queries streams T's train
    queries (learning per mode) and is evaluated on T's test queries, against the in-domain router
    (trained on every task's train queries) at the same cost cap (its cost on T at its lambda)."""
    t_start = time.time()
    keys_tr = np.asarray(evaluate.task_keys(d.train.tags), dtype=object)
    keys_te = np.asarray(evaluate.task_keys(d.test.tags), dtype=object)
    tasks = list(tasks or dict.fromkeys(keys_tr.tolist()))
    world = sim.World.from_specs(d.train.specs)
    ind = fit_offline(d.train, d.e_train, d, progress=progress)
    lam_in = calibrate(ind, router_features(ind, d.e_train), d.train, budget_pct, alpha)
    x_te_in = router_features(ind, d.e_test)
    per_task, last = [], {}
    for task in tasks:
        te_rows = np.flatnonzero(keys_te == task)
        tr_rows = np.flatnonzero(keys_tr != task)
        on_rows = np.flatnonzero(keys_tr == task)
        on_rows = on_rows[np.random.default_rng(seed).permutation(len(on_rows))]
        if not (len(te_rows) and len(tr_rows) and len(on_rows)):
            raise ValueError(f"task {task!r}: needs train queries of other tasks and train + test queries of its own")
        test_t = d.test.select(te_rows)
        cws, pts_in = sweep(ind.state, ind.registry, x_te_in[te_rows], test_t, alpha, [lam_in])
        cap = point_at(cws, pts_in, lam_in)["cost_pct"]
        q_in = hull_at(pts_in, cap)
        ood = fit_offline(d.train.select(tr_rows), d.e_train[tr_rows], d, progress=progress)
        lam = calibrate(ood, router_features(ood, d.e_train[tr_rows]), d.train.select(tr_rows), budget_pct, alpha)
        x_te = router_features(ood, d.e_test[te_rows])
        stream = sim.make_stream(d.train.select(on_rows), router_features(ood, d.e_train[on_rows]), config)
        entry = {"task": task, "n_train_other_tasks": len(tr_rows), "n_stream": len(on_rows), "n_test": len(te_rows),
                 "cost_cap_pct": cap, "in_domain": {"quality_at_cap": q_in, "at_cost_weight": point_at(cws, pts_in, lam_in)},
                 "cost_weight": lam, "modes": {}}
        runs = {}
        for mode in modes:
            res = sim.run_router(stream, world, ood.state, ood.registry, stream_policy(lam, beta, tau, alpha), config,
                                 learning=mode, name=f"ood {task} {mode}", progress=progress)
            bonus = np.asarray(feedback.bonus(res.feedback_state, x_te)) if mode == "binary" else None
            cws_o, pts = sweep(res.state, res.registry, x_te, test_t, alpha, [lam], bonus)
            q = hull_at(pts, cap)
            entry["modes"][mode] = {"quality_at_cap": q, "drop_rel_pct": rel_pct(q, q_in),
                                    "best_point_at_cap": best_under(pts, cap),
                                    "at_cost_weight": point_at(cws_o, pts, lam), "stream": res.summary()}
            if bonus is not None:
                entry["modes"][mode]["feedback_bonus_mean_abs"] = float(np.abs(bonus[:, np.asarray(res.state.active)]).mean())
            runs[mode] = res
        per_task.append(entry)
        last[task] = runs
    mean = {m: float(np.mean([e["modes"][m]["drop_rel_pct"] for e in per_task])) for m in modes}
    report = {"experiment": "out-of-domain", "latency_note": sim.LATENCY_NOTE, "reference": REFERENCE,
              "features": d.features, "config": config_dict(config), "tasks": tasks, "in_domain_cost_weight": lam_in,
              "per_task": per_task, "mean_drop_rel_pct": mean, "paper": PAPER_OOD, "seconds": time.time() - t_start}
    md = _ood_md(report)
    fig = plots.ood_fig(report, last, n_windows)
    report["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "out-of-domain", report, md, fig).items()}
    return report


def _ood_md(r: dict) -> str:
    modes = list(r["mean_drop_rel_pct"])
    lines = ["# out-of-domain: train on two tasks, stream the third", "", f"> {r['latency_note']}", "",
             "For each held-out task: the router is trained offline (full information) on the other two tasks' train "
             f"queries, streams the held-out task's train queries at {r['config']['rate']:g} q/s learning as each mode "
             "says, and is evaluated on the held-out task's test queries. Quality: % of the reference on that task, the "
             "non-decreasing convex hull of the lambda sweep at the in-domain router's cost there (the router trained "
             "on all three tasks, at its calibrated lambda); drop: relative to the in-domain router's hull quality at "
             "that cap. The mean is over the three held-out tasks.", "",
             "| held-out task | stream / test queries | cost cap % | in-domain q% | "
             + " | ".join(f"{m}: q% (drop)" for m in modes) + " |", "| --- | --- | --- | --- |" + " --- |" * len(modes)]
    for e in r["per_task"]:
        lines.append(f"| {e['task']} | {e['n_stream']} / {e['n_test']} | {fmt(e['cost_cap_pct'])} | {fmt(e['in_domain']['quality_at_cap'])} | "
                     + " | ".join(f"{fmt(e['modes'][m]['quality_at_cap'])} ({fmt(e['modes'][m]['drop_rel_pct'], 2, True)}%)" for m in modes) + " |")
    lines.append("| mean | | | | " + " | ".join(f"({fmt(r['mean_drop_rel_pct'][m], 2, True)}%)" for m in modes) + " |")
    lines += ["", f"The paper: {r['paper']['none']:+.2f}% without online learning, {r['paper']['online']:+.2f}% with it."]
    return "\n".join(lines)

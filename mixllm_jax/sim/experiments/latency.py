"""Routing under load: the router with its latency penalty vs without it, the cascades, random and
single LLMs, at rising arrival rates; `simulate_main` is one such run at one load (`mixllm-jax simulate`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax.store import checkpoint
from mixllm_jax.sim import baselines, offline_eval, simulate as sim
from mixllm_jax.offline import train
from mixllm_jax.sim.experiments import plots
from mixllm_jax.sim.experiments.common import (BUDGET_PCT, STREAM_ALPHA, STREAM_BETA, STREAM_TAU, ExperimentData, calibrate,
                                           calibration_note, config_dict, data_note, fit_offline, fmt, load_data,
                                           rel_pct, router_features, short, stream_order, stream_policy, write_outputs)
from mixllm_jax.text.router import Router


def run_latency(d: ExperimentData, out_dir, *, name: str = "latency", rates: Sequence[float] = (10.0, 20.0, 40.0),
                repeat: int = 3, config: sim.StreamConfig = sim.StreamConfig(), cost_weight: float | None = None,
                budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA, tau: float = STREAM_TAU,
                alpha: float = STREAM_ALPHA, cascade: Sequence[str] | None = None, router: Router | None = None,
                x_test: np.ndarray | None = None, singles: bool = True, n_windows: int = 20,
                progress: bool = True) -> dict:
    """Train on d.train (unless `router` is given), stream d.test (shuffled, `repeat` times) at each
    rate, and compare the router with the latency penalty (beta, tau), without it (beta = 0), the
    cascades, random and single LLMs. `config.rate` is replaced by each rate."""
    t_start = time.time()
    if router is None:
        router = fit_offline(d.train, d.e_train, d, progress=progress)
    x_tr = router_features(router, d.e_train)
    x_te = router_features(router, d.e_test) if x_test is None else np.asarray(x_test)
    lam = (calibrate(router, x_tr, d.train, budget_pct, alpha, d.reference) if cost_weight is None
           else float(cost_weight))
    order = stream_order(len(d.test), config.seed, repeat)
    ds = d.test.select(order)
    x = x_te[order]
    world = sim.World.from_specs(d.test.specs)
    # unconstrained: the same router at the same lambda with no load and no deadline
    unc = offline_eval.points(offline_eval.offline_choices(router.state, router.registry, x, ds.prompt_tokens, ds.models, [lam], alpha),
                     ds, d.reference)[0]
    cheapest = baselines.frontier_chain(d.train)[0]
    chains = {"cascade_frontier": list(cascade) if cascade else baselines.frontier_chain(d.train),
              "cascade_cheap_to_ref": [cheapest, d.reference] if cheapest != d.reference else [d.reference]}
    per_rate, results_by_rate = [], {}
    for rate in rates:
        cfg = dataclasses.replace(config, rate=float(rate))
        stream = sim.make_stream(ds, x, cfg, d.reference)
        res = {
            "mixllm": sim.run_router(stream, world, router.state, router.registry, stream_policy(lam, beta, tau, alpha), cfg,
                                     name="mixllm", progress=progress),
            "mixllm_no_penalty": sim.run_router(stream, world, router.state, router.registry,
                                                stream_policy(lam, 0.0, tau, alpha), cfg, name="mixllm_no_penalty",
                                                progress=progress),
            # the penalty on one load snapshot per window: every query of a window sees the same waits
            "mixllm_snapshot_herding": sim.run_router(
                stream, world, router.state, router.registry,
                dataclasses.replace(stream_policy(lam, beta, tau, alpha), in_batch_load=False), cfg,
                name="mixllm_snapshot_herding", progress=progress),
        }
        for cname, chain in chains.items():
            res[cname] = baselines.run_cascade(stream, world, chain, cfg, name=cname)
        res["random"] = baselines.run_random(stream, world, cfg)
        if singles:
            for m in world.models:
                res[m] = baselines.run_single(stream, world, m, cfg)
        summ = {k: r.summary() for k, r in res.items()}
        for k, r in res.items():
            if k.startswith("cascade"):
                summ[k]["chain"] = chains[k]
        q_pen = summ["mixllm"]["quality_pct"]
        acc = {"mixllm_vs_unconstrained_rel_pct": rel_pct(q_pen, unc["quality_pct"]),
               "mixllm_within_1pct": bool(rel_pct(q_pen, unc["quality_pct"]) >= -1.0),
               "no_penalty_vs_unconstrained_rel_pct": rel_pct(summ["mixllm_no_penalty"]["quality_pct"], unc["quality_pct"])}
        for cname in chains:
            acc[f"{cname}_deadline_drop_rel_pct"] = rel_pct(summ[cname]["quality_pct"], summ[cname]["quality_pct_no_deadline"])
        per_rate.append({"rate": float(rate), "duration_s": float(stream.arrival[-1]), "methods": summ,
                         "acceptance": acc,
                         "mixllm_compiles": res["mixllm"].info["compiles"]})
        results_by_rate[float(rate)] = res
    report = {
        "experiment": name, "latency_note": sim.LATENCY_NOTE, "reference": d.reference, "data": d.info(),
        "n_stream_queries": len(ds), "test_queries": len(d.test), "repeat": repeat, "features": d.features,
        "config": config_dict(config), "rates": list(map(float, rates)),
        "policy": {"cost_weight": lam, "beta": beta, "tau": tau, "alpha": alpha,
                   "cost_weight_from": "given" if cost_weight is not None else calibration_note(d, budget_pct, "train")},
        "unconstrained": unc, "cascades": chains, "per_rate": per_rate,
        "seconds": time.time() - t_start,
    }
    md = _latency_md(report)
    fig = plots.latency_fig(report, results_by_rate, n_windows)
    report["paths"] = {k: str(v) for k, v in write_outputs(out_dir, name, report, md, fig).items()}
    return report


def _latency_md(r: dict) -> str:
    pol = r["policy"]
    lines = [f"# {r['experiment']}: routing under load ({r['n_stream_queries']} queries: the test split x{r['repeat']}, shuffled)",
             "", f"> {r['latency_note']}", "", data_note(r), "",
             f"Router: cost weight {pol['cost_weight']:.4g} ({pol['cost_weight_from']}), alpha {pol['alpha']}, "
             f"latency penalty beta {pol['beta']} starting at tau = {pol['tau']} s; `mixllm_no_penalty` is the same "
             f"router with beta = 0; `mixllm_snapshot_herding` keeps the penalty but scores each routing window against one load "
             f"snapshot (no in-batch load: the window's queries herd). Queries score quality 0 past the {r['config']['tolerance_s']} s tolerance; satisfied = "
             f"quality > {r['config']['satisfied_quality']} and wait < {r['config']['satisfied_wait_s']} s. Load snapshot "
             f"refreshed every {r['config']['refresh_s']} s; routing windows of {r['config']['batch_s']} s. Quality and cost "
             f"are % of {r['reference']}'s logged totals on the same queries. Unconstrained (no load, no deadline, same "
             f"cost weight): quality {r['unconstrained']['quality_pct']:.2f}%, cost {r['unconstrained']['cost_pct']:.2f}%.",
             "", "Cascades (escalate while the answer's quality < 0.7): " +
             "; ".join(f"`{k}` = {' > '.join(short(m) for m in v)}" for k, v in r["cascades"].items()) +
             ". The cascade observes each answer's true logged quality"
             + (" (RouterBench scores are 0/1 correctness)" if r["data"]["name"] == "RouterBench" else "") + " "
             "before deciding to escalate, a verifier no deployed cascade has: its no-deadline quality is an "
             "optimistic bound, and can exceed the reference's.", ""]
    lines += ["## Acceptance", "", "| rate (q/s) | mixllm q% (30 s) | vs unconstrained | no-penalty q% (30 s) | vs unconstrained | "
              + " | ".join(f"{k} drop from deadline" for k in r["cascades"]) + " |",
              "| --- |" + " --- |" * (4 + len(r["cascades"]))]
    for pr in r["per_rate"]:
        a, m = pr["acceptance"], pr["methods"]
        lines.append(f"| {pr['rate']:g} | {fmt(m['mixllm']['quality_pct'])} | {fmt(a['mixllm_vs_unconstrained_rel_pct'], 2, True)}% | "
                     f"{fmt(m['mixllm_no_penalty']['quality_pct'])} | {fmt(a['no_penalty_vs_unconstrained_rel_pct'], 2, True)}% | "
                     + " | ".join(f"{fmt(a[f'{k}_deadline_drop_rel_pct'], 2, True)}%" for k in r["cascades"]) + " |")
    for pr in r["per_rate"]:
        lines += ["", f"## {pr['rate']:g} queries/s ({pr['duration_s']:.0f} s of stream)", "",
                  "| method | quality% (30 s deadline) | quality% (no deadline) | cost% | mean wait s | p95 wait s | timeouts % | satisfied % | calls/query |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, s in pr["methods"].items():
            lines.append(f"| {short(k)} | {fmt(s['quality_pct'])} | {fmt(s['quality_pct_no_deadline'])} | {fmt(s['cost_pct'])} | "
                         f"{fmt(s['mean_wait_s'], 1)} | {fmt(s['p95_wait_s'], 1)} | {fmt(s['timeout_pct'], 1)} | "
                         f"{fmt(s['satisfaction_pct'], 1)} | {fmt(s['mean_calls'], 2)} |")
    return "\n".join(lines)


def simulate_main(*, out_dir: str | Path = "runs/simulate", rate: float = 10.0, arrival: str = "uniform",
                  batch_s: float = 1.0, refresh_s: float | None = 10.0, tolerance_s: float = 30.0,
                  cost_weight: float | None = None, budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA,
                  tau: float = STREAM_TAU, alpha: float = STREAM_ALPHA, repeat: int = 1, seed: int = 0,
                  router_path: str | Path | None = None, quick: bool = False, data_path: str | Path | None = None,
                  models: str | Path | None = None, reference: str | None = None, progress: bool = True) -> dict:
    """`mixllm-jax simulate`: one stream at one load; writes simulate.json / .md / .png in out_dir.

    Trains a router on the train split of the RouterBench slice or of `data_path` (with `models`;
    see `common.load_splits`) or restores `router_path`, a checkpoint, and embeds with its encoder;
    streams the test split (shuffled, `repeat` times) at `rate` queries/s
    (`arrival` "uniform" or "poisson"; routing windows of `batch_s` s; load snapshot refreshed every
    `refresh_s` s, None/0 = continuously; quality 0 past `tolerance_s`), and reports the router with
    the latency penalty (beta, tau) and without it, the cascades, random and every single LLM.
    Quality and cost are % of the `reference` LLM's (default gpt-4-1106-preview); cost_weight None:
    calibrated on the train split to `budget_pct`% of the reference's cost (0 on cost-blind data).
    Returns the report dict (report["paths"] lists the files written).
    """
    config = sim.StreamConfig(rate=rate, arrival=arrival, batch_s=batch_s, refresh_s=refresh_s,
                              tolerance_s=tolerance_s, seed=seed)
    if router_path is not None:
        router = checkpoint.restore_router(router_path)[0]
        d = load_data(quick, features="onehot" if router.encoder is None else "encoder",
                      max_length=router.max_length, data_path=data_path, models=models, reference=reference,
                      progress=progress)
        if router.encoder is not None:
            d.e_train = train.embed(router.encoder, d.train, router.max_length, router.truncation_side, progress=progress)
            d.e_test = train.embed(router.encoder, d.test, router.max_length, router.truncation_side, progress=progress)
    else:
        router = None
        d = load_data(quick, data_path=data_path, models=models, reference=reference, progress=progress)
    return run_latency(d, out_dir, name="simulate", rates=(rate,), repeat=repeat, config=config,
                       cost_weight=cost_weight, budget_pct=budget_pct, beta=beta, tau=tau, alpha=alpha,
                       router=router, progress=progress)

"""Off-policy evaluation checked against the truth: a stochastic router serves the test split in
the stream simulator and logs every decision with its propensity; IPS, SNIPS and doubly robust
estimates of three other policies from that log are compared with their true values, which the
full-information log gives exactly (every LLM's outcome of every query is recorded)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mixllm_jax.store import checkpoint
from mixllm_jax.offline import ope
from mixllm_jax.sim import simulate as sim
from mixllm_jax.sim.experiments.common import (BUDGET_PCT, FAST_FIT, STREAM_BETA, STREAM_TAU, ExperimentData, calibrate,
                                           calibration_note, data_note, fit_offline, fmt, router_features,
                                           stream_policy, write_outputs)

LOG_TEMPERATURE, LOG_EPSILON = 0.1, 0.1
"""The logging policy: softmax(score / 0.1) mixed with 10% uniformly random LLMs, so every LLM has
a propensity of at least 0.1 / M on every query."""


def run_ope(d: ExperimentData, out_dir, *, budget_pct: float = BUDGET_PCT, temperature: float = LOG_TEMPERATURE,
            epsilon: float = LOG_EPSILON, config: sim.StreamConfig = sim.StreamConfig(), seed: int = 0,
            fast_fit: bool = True, save_router: bool = True, progress: bool = True) -> dict:
    """Train a router on d.train; stream d.test through it with the logging policy (cost weight
    calibrated to budget_pct, softmax `temperature`, `epsilon`-mixing; load and latency penalty as in
    the other experiments) and write the log (ope-log.jsonl: features, LLM, reward = logged
    quality, propensity). Then estimate from the log the value (mean quality) of three greedy
    policies of the router -- at the calibrated cost weight, at 0 (quality first) and at 4 times
    it (cheaper) -- and compare with their true values on the same queries."""
    t_start = time.time()
    out = Path(out_dir)
    if fast_fit:
        d = dataclasses.replace(d, config=d.config.replace(**FAST_FIT))
    router = fit_offline(d.train, d.e_train, d, progress=progress)
    lam = calibrate(router, router_features(router, d.e_train), d.train, budget_pct, 0.0, d.reference)
    x = router_features(router, d.e_test)
    cfg = dataclasses.replace(config, seed=seed)
    stream = sim.make_stream(d.test, x, cfg, d.reference)
    logging = stream_policy(lam, STREAM_BETA, STREAM_TAU, 0.0, explore="greedy", temperature=temperature,
                            epsilon=epsilon)
    res = sim.run_router(stream, sim.World.from_specs(d.train.specs), router.state, router.registry, logging, cfg,
                         name="logging policy", progress=progress)
    models = [d.test.models[m] for m in res.model]
    log_path = ope.write_log(out / "ope-log.jsonl", x, d.test.prompt_tokens, models, res.quality_raw, res.propensity)
    log = ope.read_log(log_path)
    router_dir = None
    if save_router:
        router_dir = out / "ope-router"
        checkpoint.save_router(dataclasses.replace(router, policy=logging.replace(temperature=0.0, epsilon=0.0)),
                               router_dir)
    targets = {"greedy at the calibrated cost weight": lam, "greedy, quality first (cost weight 0)": 0.0,
               "greedy at 4x the cost weight (cheaper)": 4 * lam}
    rows = []
    q_true = d.test.quality.astype(np.float64)
    for name, cw in targets.items():
        pol = stream_policy(cw, 0.0, STREAM_TAU, 0.0, explore="greedy")
        est = ope.evaluate_router_on_log(log, router.state, router.registry, pol)
        pi, _ = ope.policy_probs(router.state, router.registry, log.x, log.prompt_tokens, pol, d.test.models)
        truth = float((pi * q_true).sum(1).mean())
        rows.append({"policy": name, "cost_weight": cw, "truth": truth, "estimates": est,
                     "covered": {k: est[k]["low"] <= truth <= est[k]["high"] for k in ("ips", "snips", "dr")}})
    logging_value = float(res.quality_raw.mean())
    report = {"experiment": "ope", "latency_note": sim.LATENCY_NOTE, "data": d.info(), "reference": d.reference, "features": d.features,
              "logging_policy": {"cost_weight": lam, "temperature": temperature, "epsilon": epsilon,
                                 "value": logging_value, "mean_propensity": float(res.propensity.mean()),
                                 "min_propensity": float(res.propensity.min()),
                                 "cost_weight_from": calibration_note(d, budget_pct, "train")},
              "log": str(log_path), "router": None if router_dir is None else str(router_dir), "n": len(log),
              "targets": rows, "all_covered": all(all(r["covered"].values()) for r in rows),
              "dr_and_ips_covered": all(r["covered"]["dr"] and r["covered"]["ips"] for r in rows),
              "seconds": time.time() - t_start}
    fig = _fig(report)
    report["paths"] = {k: str(v) for k, v in write_outputs(out, "ope", report, _md(report), fig).items()}
    return report


def _md(r: dict) -> str:
    lp = r["logging_policy"]
    lines = ["# ope: off-policy estimates against the truth", "", f"> {r['latency_note']}", "", data_note(r), "",
             f"The logging policy (the router at cost weight {lp['cost_weight']:.4g}, softmax temperature "
             f"{lp['temperature']:g}, epsilon {lp['epsilon']:g}) served the {r['n']} test queries in the stream simulator "
             f"and logged each decision's propensity (mean {lp['mean_propensity']:.3f}, min {lp['min_propensity']:.4f}); "
             f"its own mean quality {lp['value']:.4f}. The reward is the logged quality of the chosen LLM. For three "
             "greedy policies of the same router, the estimates (95% intervals) from that log, and the truth from "
             "the full-information log on the same queries:", "",
             "| target policy | truth | IPS | SNIPS | DR | truth inside the 95% interval (IPS / SNIPS / DR) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t in r["targets"]:
        e = t["estimates"]
        cell = lambda k: f"{fmt(e[k]['value'], 4)} [{fmt(e[k]['low'], 4)}, {fmt(e[k]['high'], 4)}]"  # noqa: E731
        lines.append(f"| {t['policy']} | {fmt(t['truth'], 4)} | {cell('ips')} | {cell('snips')} | {cell('dr')} | "
                     + " / ".join("yes" if t["covered"][k] else "no" for k in ("ips", "snips", "dr")) + " |")
    lines += ["", f"Every estimate covers the truth: {r['all_covered']}. The same numbers come from "
              f"`mixllm-jax ope --log {r['log']} --router {r['router']} --cost-weight W` for each target's W."]
    return "\n".join(lines)


def _fig(r: dict):
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    for i, t in enumerate(r["targets"]):
        for j, k in enumerate(("ips", "snips", "dr")):
            e = t["estimates"][k]
            ax.errorbar(i + (j - 1) * 0.2, e["value"], yerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]],
                        fmt="o", capsize=3, color=f"C{j}", label=k.upper() if i == 0 else None)
        ax.hlines(t["truth"], i - 0.35, i + 0.35, color="black", label="truth" if i == 0 else None)
    ax.set_xticks(range(len(r["targets"])), [t["policy"].replace(" (", "\n(") for t in r["targets"]], fontsize=7)
    ax.set(ylabel="mean quality", title="off-policy estimates (95% intervals) vs the true value")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig

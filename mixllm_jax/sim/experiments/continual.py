"""Continual learning (the paper's Table 1): offline:online splits, no / refined / binary feedback."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax.core import feedback_net
from mixllm_jax.sim import offline_eval, simulate as sim
from mixllm_jax.offline import train
from mixllm_jax.sim.experiments import plots
from mixllm_jax.sim.experiments.common import (BINARY_TEMPERATURE, BUDGET_PCT, FAST_FIT, ONLINE_ALPHA, PAPER_TABLE1, STREAM_BETA,
                                           STREAM_TAU, ExperimentData, arm_trace, band_quality, best_under, calibrate,
                                           calibration_note, config_dict, data_note, fit_offline, fmt, hull_at,
                                           mode_policy, point_at, refit_arms, regret_curve, rel_pct, router_features, split_idx,
                                           sweep, write_outputs)


def run_continual(d: ExperimentData, out_dir, *, splits: Sequence[float] = (0.8, 0.5, 0.3),
                  extra_splits: Sequence[float] = (0.1, 0.05),
                  modes: Sequence[str] = ("none", "refined", "binary", "refined_greedy", "refined_thompson"),
                  seeds: Sequence[int] = (0, 1, 2), config: sim.StreamConfig = sim.StreamConfig(),
                  budget_pct: float = BUDGET_PCT, band: tuple[float, float] = (5.0, 30.0),
                  beta: float = STREAM_BETA, tau: float = STREAM_TAU, alpha: float = ONLINE_ALPHA,
                  explore: str = "ucb", prior_weight: float = 1.0, fast_fit: bool = True,
                  n_windows: int = 20, progress: bool = True) -> dict:
    """For each offline fraction (splits, then the supplementary extra_splits) and seed: train
    offline (full information) on that part of d.train, stream the rest (10 q/s, with load) learning
    as each mode says (ONLINE_MODES: none, refined with `explore`, binary on-policy, refined greedy /
    Thompson), then evaluate every final state on d.test (no load, greedy: no exploration bonus).
    Also a full-information upper reference: the arms refitted on both parts with every LLM's
    outcome, their priors re-chosen by evidence (`refit_arms`).

    Quality at equal or lower cost: the hull quality of each state's lambda sweep at the no-online
    router's test cost at its calibrated lambda (`hull_at`); `band_quality` averages the hull over
    `band` cost %. Gains are relative to no online learning, averaged over seeds. Regret: each
    stream's cumulative regret (reward = logged quality - lambda * cost) against the best fixed
    policy in hindsight (the router refitted with every LLM's outcome of the whole stream, routing
    the stream greedily). prior_weight discounts the offline log (RouterConfig.prior_weight);
    fast_fit: FAST_FIT (evidence-chosen ridges) for the offline routers."""
    if "none" not in modes:
        raise ValueError("modes must include 'none' (the baseline of the gains)")
    t_start = time.time()
    d = dataclasses.replace(d, config=d.config.replace(prior_weight=prior_weight, **(FAST_FIT if fast_fit else {})))
    world = sim.World.from_specs(d.train.specs)
    rows, last_runs = [], {}
    all_splits = list(splits) + [f for f in extra_splits if f not in splits]
    for frac in all_splits:
        for seed in seeds:
            off_i, on_i = split_idx(len(d.train), frac, seed)
            off, on = d.train.select(off_i), d.train.select(on_i)
            router = fit_offline(off, d.e_train[off_i], d, progress=progress)
            x_off, x_on, x_te = (router_features(router, e) for e in (d.e_train[off_i], d.e_train[on_i], d.e_test))
            lam = calibrate(router, x_off, off, budget_pct, 0.0, d.reference)
            cfg = dataclasses.replace(config, seed=seed)
            stream = sim.make_stream(on, x_on, cfg, d.reference)
            hindsight = train.fill_arms(router.state, router.registry, x_on, on, progress=progress)
            best_cols = offline_eval.offline_choices(hindsight, router.registry, x_on, on.prompt_tokens, on.models, [lam], 0.0)[0]
            full_state = refit_arms(router, [x_off, x_on], [off, on])
            best = on.quality[np.arange(len(on)), best_cols] - lam * on.cost[np.arange(len(on)), best_cols]
            entry = {"offline_frac": frac, "seed": seed, "n_offline": len(off), "n_online": len(on),
                     "cost_weight": lam, "modes": {}}
            runs = {}
            for mode in modes:
                learning, pol = mode_policy(mode, lam, beta, tau, alpha, explore)
                res = sim.run_router(stream, world, router.state, router.registry, pol, cfg, learning=learning,
                                     name=f"{mode} {round(frac * 100)}:{round((1 - frac) * 100)}", progress=progress)
                bonus = None
                if learning == "binary":
                    bonus = np.asarray(feedback_net.bonus(res.feedback_state, x_te))
                cws, pts = sweep(res.state, res.registry, x_te, d.test, 0.0, [lam], bonus, d.reference)
                entry["modes"][mode] = {"test_at_cost_weight": point_at(cws, pts, lam), "test_points": pts,
                                        "stream": res.summary(), "regret": regret_curve(res, best, lam),
                                        "arm_trace": arm_trace(res), "mean_propensity": float(res.propensity.mean())}
                if bonus is not None:
                    entry["modes"][mode]["feedback_bonus_mean_abs"] = float(
                        np.abs(bonus[:, np.asarray(res.state.active)]).mean())
                runs[mode] = res
            cws, pts = sweep(full_state, router.registry, x_te, d.test, 0.0, [lam], reference=d.reference)
            entry["full_information"] = {"test_at_cost_weight": point_at(cws, pts, lam), "test_points": pts}
            cap = entry["modes"]["none"]["test_at_cost_weight"]["cost_pct"]
            entry["cost_cap_pct"] = cap
            base = hull_at(entry["modes"]["none"]["test_points"], cap)
            base_band = band_quality(entry["modes"]["none"]["test_points"], band)
            base_best = best_under(entry["modes"]["none"]["test_points"], cap)
            for key, m in [*entry["modes"].items(), ("full_information", entry["full_information"])]:
                m["quality_at_cap"] = hull_at(m["test_points"], cap)
                m["gain_rel_pct"] = rel_pct(m["quality_at_cap"], base)
                m["band_quality"] = band_quality(m["test_points"], band)
                m["band_gain_rel_pct"] = rel_pct(m["band_quality"], base_band)
                m["best_point_at_cap"] = best_under(m["test_points"], cap)
                m["best_point_gain_rel_pct"] = rel_pct(m["best_point_at_cap"], base_best)
            rows.append(entry)
            if frac == min(splits):
                last_runs[frac] = runs
    table = []
    for frac in all_splits:
        es = [e for e in rows if e["offline_frac"] == frac]
        row = {"offline_frac": frac, "split": f"{round(frac * 100)}:{round((1 - frac) * 100)}", "n_seeds": len(es),
               "supplementary": frac not in splits, "n_offline": es[0]["n_offline"], "n_online": es[0]["n_online"]}
        for key in [*modes, "full_information"]:
            get = (lambda e: e["modes"][key]) if key in modes else (lambda e: e["full_information"])
            mean = lambda k: _mean([get(e)[k] for e in es])  # noqa: E731
            row[key] = {"quality_at_cap": mean("quality_at_cap"), "gain_rel_pct": mean("gain_rel_pct"),
                        "gain_rel_pct_per_seed": [get(e)["gain_rel_pct"] for e in es],
                        "band_quality": mean("band_quality"), "band_gain_rel_pct": mean("band_gain_rel_pct"),
                        "best_point_gain_rel_pct": mean("best_point_gain_rel_pct"),
                        "quality_at_cost_weight": float(np.mean([get(e)["test_at_cost_weight"]["quality_pct"] for e in es])),
                        "cost_at_cost_weight": float(np.mean([get(e)["test_at_cost_weight"]["cost_pct"] for e in es]))}
        row["cost_cap_pct"] = float(np.mean([e["cost_cap_pct"] for e in es]))
        for key in modes:
            row[key]["regret_final"] = float(np.mean([e["modes"][key]["regret"]["final"] for e in es]))
            row[key]["regret_final_per_seed"] = [e["modes"][key]["regret"]["final"] for e in es]
            row[key]["regret_curve"] = {"n": es[0]["modes"][key]["regret"]["n"],
                                        "regret": np.mean([e["modes"][key]["regret"]["regret"] for e in es], 0).tolist()}
            for k in ("quality_pct", "cost_pct", "satisfaction_pct"):
                row[key][f"stream_{k}"] = float(np.mean([e["modes"][key]["stream"][k] for e in es]))
        for mode in ("refined", "binary"):
            if mode in modes:
                row[f"paper_{mode}_gain_pct"] = PAPER_TABLE1[mode].get(frac)
        table.append(row)
    acc = {}
    main = [r for r in table if not r["supplementary"]]
    if "refined" in modes and main:
        acc["refined_gain_every_split"] = all(r["refined"]["gain_rel_pct"] > 0 for r in main)
        r30 = next((r for r in main if abs(r["offline_frac"] - 0.3) < 1e-9), None)
        if r30 is not None:
            acc["refined_gain_30_70_pct"] = r30["refined"]["gain_rel_pct"]
            acc["paper_refined_gain_30_70_pct"] = PAPER_TABLE1["refined"][0.3]
            acc["shortfall_vs_paper_pct_points"] = max(0.0, PAPER_TABLE1["refined"][0.3] - r30["refined"]["gain_rel_pct"])
            acc["full_information_gain_30_70_pct"] = r30["full_information"]["gain_rel_pct"]
    if "binary" in modes and main:
        acc["binary_gain_every_split"] = all(r["binary"]["gain_rel_pct"] > 0 for r in main)
    explorers = [m for m in ("refined", "refined_thompson") if m in modes]
    if "refined_greedy" in modes and explorers and main:
        acc["exploration_lowers_regret_every_split"] = {
            m: all(r[m]["regret_final"] < r["refined_greedy"]["regret_final"] for r in main) for m in explorers}
    report = {"experiment": "continual", "latency_note": sim.LATENCY_NOTE, "reference": d.reference, "data": d.info(),
              "features": d.features, "config": config_dict(config), "splits": list(splits),
              "extra_splits": [f for f in extra_splits if f not in splits], "seeds": list(seeds), "band_pct": list(band),
              "modes": list(modes), "policy": {"beta": beta, "tau": tau, "alpha": alpha, "explore": explore,
                                               "prior_weight": prior_weight, "fast_fit": FAST_FIT if fast_fit else None,
                                               "binary_temperature": BINARY_TEMPERATURE,
                                               "cost_weight_from": calibration_note(d, budget_pct, "the offline part")},
              "table": table, "runs": rows, "acceptance": acc, "paper_table1": {k: {str(f): v for f, v in m.items()}
                                                                                  for k, m in PAPER_TABLE1.items()},
              "seconds": time.time() - t_start}
    md = _continual_md(report)
    fig = plots.continual_fig(report, last_runs, n_windows)
    report["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "continual", report, md, fig).items()}
    regret_png = Path(out_dir) / "continual-regret.png"
    plots.regret_fig(report).savefig(regret_png, dpi=110)
    report["paths"]["regret_png"] = str(regret_png)
    return report


def _mean(vals) -> float | None:
    """Mean over seeds; None when a seed has none (e.g. a band gain where the band is below every
    cost of the sweep, as on cost-blind data)."""
    return None if any(v is None for v in vals) else float(np.mean(vals))


def _continual_md(r: dict) -> str:
    modes = r["modes"]
    lo, hi = r["band_pct"]
    lines = ["# continual: online learning from feedback (the paper's Table 1 setup)", "", f"> {r['latency_note']}", "",
             data_note(r), "",
             f"Per split of the {r['data']['name']} train split (offline:online, random, seeds " + ", ".join(map(str, r["seeds"])) +
             "): train offline with full information on the offline part; stream the online part at "
             f"{r['config']['rate']:g} queries/s with load; `refined` updates the chosen LLM's arm with its observed "
             "quality and completion tokens (bandit feedback), `binary` trains the dynamic feedback network on "
             "satisfied / not; then evaluate on the test split with no load. `q%` is % of "
             f"{r['reference']}'s quality at equal or lower cost: the non-decreasing convex hull of the state's lambda "
             "sweep at the no-online router's test cost at its calibrated lambda (`cap`); gains are relative to no "
             f"online learning, mean over seeds. `band` gains compare the mean hull quality over {lo:g}-{hi:g}% cost. "
             "`full info` refits the arms on the offline and online parts with every LLM's outcome, each arm's prior "
             "re-chosen by evidence (an upper reference: what the arms could learn from the online part at best, "
             "hyper-parameters included; not a deployable mode).",
             "", "| offline:online | cap % | none q% | " + " | ".join(f"{m} q% (gain) [paper]" for m in modes if m != "none")
             + " | full info q% (gain) | band gains: " + " / ".join([m for m in modes if m != "none"] + ["full"]) + " |",
             "| --- | --- | --- |" + " --- |" * (len(modes) - 1) + " --- | --- |"]
    for row in r["table"]:
        cells = [f"{fmt(row[m]['quality_at_cap'])} ({fmt(row[m]['gain_rel_pct'], 2, True)}%) "
                 f"[{fmt(row.get(f'paper_{m}_gain_pct'), 2, True)}%]" for m in modes if m != "none"]
        fi = row["full_information"]
        bands = " / ".join(f"{fmt(row[m]['band_gain_rel_pct'], 2, True)}%" for m in [*modes[1:], "full_information"] if m != "none")
        split = row["split"] + (" (suppl.)" if row["supplementary"] else "")
        lines.append(f"| {split} | {fmt(row['cost_cap_pct'])} | {fmt(row['none']['quality_at_cap'])} | " + " | ".join(cells)
                     + f" | {fmt(fi['quality_at_cap'])} ({fmt(fi['gain_rel_pct'], 2, True)}%) | {bands} |")
    if len(r["seeds"]) > 1:
        lines += ["", "Per-seed gains at the cap (% relative):", ""] + [
            f"- {row['split']}: " + "; ".join(f"{m} {[round(g, 2) for g in row[m]['gain_rel_pct_per_seed']]}"
                                              for m in [*modes, "full_information"] if m != "none") for row in r["table"]]
    lines += ["", "At the calibrated cost weight itself (quality% / cost%, mean over seeds):", "",
              "| offline:online | " + " | ".join(modes) + " | full info |", "| --- |" + " --- |" * (len(modes) + 1)]
    for row in r["table"]:
        lines.append(f"| {row['split']} | " + " | ".join(
            f"{fmt(row[m]['quality_at_cost_weight'])} / {fmt(row[m]['cost_at_cost_weight'])}"
            for m in [*modes, "full_information"]) + " |")
    a = r["acceptance"]
    if "refined_gain_30_70_pct" in a:
        lines += ["", f"Refined gain at 30:70: {fmt(a['refined_gain_30_70_pct'], 2, True)}% vs the paper's "
                  f"+{a['paper_refined_gain_30_70_pct']}%: short by {fmt(a['shortfall_vs_paper_pct_points'])} percentage "
                  f"points; the full-information reference gains {fmt(a['full_information_gain_30_70_pct'], 2, True)}% there. "
                  f"Refined gain positive in every split: {a['refined_gain_every_split']}."]
    if "binary_gain_every_split" in a:
        lines += ["", f"Binary gain positive in every split: {a['binary_gain_every_split']}."]
    p = r["policy"]
    lines += ["", "## Exploration: regret in the stream", "",
              f"Exploration `{p['explore']}` at alpha = {p['alpha']:g} posterior s.d.s, offline log weight "
              f"(prior_weight) {p['prior_weight']:g}; binary decisions drawn from softmax(score / "
              f"{p['binary_temperature']:g}). Regret: cumulative (logged quality - lambda * cost) of the best fixed "
              "policy in hindsight (the router refitted with every LLM's outcome of the whole stream, routing it "
              "greedily) minus the stream's, over the online part (mean over seeds; lower is better; see "
              "continual-regret.png). Stream q% / cost %: realised in the stream (30 s deadline).", "",
              "| offline:online | " + " | ".join(f"{m}: regret (stream q% / cost%)" for m in modes) + " |",
              "| --- |" + " --- |" * len(modes)]
    for row in r["table"]:
        lines.append(f"| {row['split']} | " + " | ".join(
            f"{fmt(row[m]['regret_final'], 1)} ({fmt(row[m]['stream_quality_pct'])} / {fmt(row[m]['stream_cost_pct'])})"
            for m in modes) + " |")
    if "exploration_lowers_regret_every_split" in a:
        lines += ["", "Exploration lowers the regret against greedy refined learning in every split: "
                  + ", ".join(f"{m}: {v}" for m, v in a["exploration_lowers_regret_every_split"].items()) + "."]
    lines += ["", "![regret](continual-regret.png)"]
    return "\n".join(lines)

"""Out of domain: a router that never saw some tasks streams their queries (learning online) and is
compared, at the same cost, with a router that saw them offline.

Two protocols:
* held-out tasks (any data): for each task T, train without T, stream T's train queries, evaluate on
  T's test queries; the reference is the in-domain router (trained on every task's train queries).
* the data's `ood` split (when it has one, e.g. routerdc7): tasks never seen in train. The router
  trained on all of train streams part of each ood task's queries and is evaluated on the rest; the
  reference is a router trained offline on train plus those stream queries ("seen").
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax.text import domains
from mixllm_jax.offline import evaluate, train
from mixllm_jax.core import feedback_net
from mixllm_jax.sim import offline_eval, simulate as sim
from mixllm_jax.data import Dataset
from mixllm_jax.sim.experiments import plots
from mixllm_jax.sim.experiments.common import (BUDGET_PCT, FAST_FIT, ONLINE_ALPHA, PAPER_OOD, STREAM_BETA, STREAM_TAU,
                                           ExperimentData, best_under, calibrate, calibration_note, concat,
                                           config_dict, data_note, fit_offline, fmt, hull_at, mode_policy, point_at,
                                           regret_curve, rel_pct, router_features, sweep, write_outputs)
from mixllm_jax.text.router import Router

OOD_SPLIT = "ood split"
"""The label of the `ood`-split protocol in the figure and the stream names."""


def run_ood(d: ExperimentData, out_dir, *, tasks: Sequence[str] | None = None,
            modes: Sequence[str] = ("none", "refined", "binary", "refined_greedy", "refined_thompson"),
            config: sim.StreamConfig = sim.StreamConfig(),
            budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA, tau: float = STREAM_TAU,
            alpha: float = ONLINE_ALPHA, explore: str = "ucb", prior_weight: float = 1.0, grow_domains: bool = True,
            spare_domains: int = 4, fast_fit: bool = True, seeds: Sequence[int] = (0, 1, 2), held_out_tasks: bool = True,
            ood_stream_frac: float = 0.5, n_windows: int = 20, progress: bool = True) -> dict:
    """Held-out tasks (unless held_out_tasks=False): for each task T of `tasks` (default every task
    of d.train that has test queries), a router trained on the other tasks' train queries streams
    T's train queries (learning per mode) and is evaluated on T's test queries, against the
    in-domain router (trained on every task's train queries) at the same cost cap (its cost on T at
    its lambda).

    The `ood` split (when d.ood is set): the in-domain router (trained on all of d.train) streams
    `ood_stream_frac` of each ood task's queries (tasks interleaved) and is evaluated on the rest,
    against a router trained offline on d.train plus the stream queries, at its cost there.

    Modes are common.ONLINE_MODES (none: no learning, greedy; refined: bandit feedback with
    `explore` at alpha posterior s.d.s; binary: the on-policy feedback network). grow_domains: the
    streaming routers keep `spare_domains` free domain slots and open domains for far queries as
    the stream goes (domains.DomainGrowth; the same features for every mode); every final state
    is evaluated greedily with the grown domains.

    seeds: each protocol runs once per seed, and its drops, reductions and regrets are averaged
    over them (report["held_out_seeds"], report["ood_split_seeds"]; report["per_task"] and
    report["ood_split"] detail the first seed): a seed orders each held-out task's stream, and
    draws the ood split's stream / evaluation halves and their order."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if not held_out_tasks and d.ood is None:
        raise ValueError("nothing to run: held_out_tasks is off and the data has no ood split")
    t_start = time.time()
    # domains grow only with the tag head's domain features (not on quick runs' one-hot task features)
    grow_domains = grow_domains and d.config.head is not None and d.config.features == "raw+domain"
    ref_cfg = d.config.replace(**(FAST_FIT if fast_fit else {}))
    d_ref = dataclasses.replace(d, config=ref_cfg)  # routers that do not stream: no spare domains
    d = dataclasses.replace(d, config=ref_cfg.replace(prior_weight=prior_weight,
                                                      spare_domains=spare_domains if grow_domains else 0))
    opts = {"explore": explore, "grow": grow_domains}
    world = sim.World.from_specs(d.train.specs)
    ind = fit_offline(d.train, d.e_train, d, progress=progress)
    lam_in = calibrate(ind, router_features(ind, d.e_train), d.train, budget_pct, 0.0, d.reference)
    per_task, last, tasks_run, skipped = [], {}, [], []
    if held_out_tasks:
        keys_tr = np.asarray(evaluate.task_keys(d.train.tags), dtype=object)
        keys_te = np.asarray(evaluate.task_keys(d.test.tags), dtype=object)
        tasks_run = list(tasks or dict.fromkeys(keys_tr.tolist()))
        if not tasks:  # by default, only the tasks that can be held out (e.g. not one missing from a quick subset)
            skipped = [t for t in tasks_run if not ((keys_te == t).any() and (keys_tr != t).any())]
            tasks_run = [t for t in tasks_run if t not in skipped]
        x_te_in = router_features(ind, d.e_test)
    by_seed = [[] for _ in seeds]  # each seed's held-out task entries
    for task in tasks_run:
        te_rows = np.flatnonzero(keys_te == task)
        tr_rows = np.flatnonzero(keys_tr != task)
        on_all = np.flatnonzero(keys_tr == task)
        if not (len(te_rows) and len(tr_rows) and len(on_all)):
            raise ValueError(f"task {task!r}: needs train queries of other tasks and train + test queries of its own")
        test_t = d.test.select(te_rows)
        cws, pts_in = sweep(ind.state, ind.registry, x_te_in[te_rows], test_t, 0.0, [lam_in], reference=d.reference)
        cap = point_at(cws, pts_in, lam_in)["cost_pct"]
        q_in = hull_at(pts_in, cap)
        ood = fit_offline(d.train.select(tr_rows), d.e_train[tr_rows], d, progress=progress)
        lam = calibrate(ood, router_features(ood, d.e_train[tr_rows]), d.train.select(tr_rows), budget_pct, 0.0,
                        d.reference)
        for i, seed in enumerate(seeds):  # each seed orders the stream (and so the domains it opens)
            on_rows = on_all[np.random.default_rng(seed).permutation(len(on_all))]
            x_stream, ood_eval, growth = _grown_features(ood, d.e_train[tr_rows], d.e_train[on_rows], grow_domains)
            stream = sim.make_stream(d.train.select(on_rows), x_stream, config, d.reference)
            entry = {"task": task, "n_train_other_tasks": len(tr_rows), "n_stream": len(on_rows),
                     "n_test": len(te_rows), "cost_cap_pct": cap,
                     "in_domain": {"quality_at_cap": q_in, "at_cost_weight": point_at(cws, pts_in, lam_in)},
                     "cost_weight": lam}
            entry["modes"], runs = _stream_modes(d, ood, lam, stream, world,
                                                 router_features(ood_eval, d.e_test[te_rows]), test_t, cap, q_in,
                                                 modes, config, beta, tau, alpha, task, progress, opts=opts,
                                                 stream_ds=d.train.select(on_rows))
            entry["domains"] = growth.summary() if growth is not None else None
            by_seed[i].append(entry)
            if i == 0:
                per_task.append(entry)
                last[task] = runs
    held_out_seeds = _over_seeds([_task_mean(es, modes) for es in by_seed], seeds, modes) if per_task else None
    mean = {m: held_out_seeds["mean"][m]["drop_rel_pct"] for m in modes} if per_task else {}
    split, over_seeds = None, None
    if d.ood is not None:
        splits = []
        for i, seed in enumerate(seeds):
            s, runs = _ood_split(d, ind, lam_in, world, modes, config, budget_pct, beta, tau, alpha, seed,
                                 ood_stream_frac, progress, d_ref, opts)
            splits.append(s)
            if i == 0:
                split, last[OOD_SPLIT] = s, runs
        over_seeds = _over_seeds(splits, seeds, modes)
    report = {"experiment": "out-of-domain", "latency_note": sim.LATENCY_NOTE, "reference": d.reference,
              "data": d.info(), "features": d.features, "config": config_dict(config), "modes": list(modes),
              "tasks": tasks_run, "skipped_tasks": skipped, "in_domain_cost_weight": lam_in,
              "cost_weight_from": calibration_note(d, budget_pct, "each router's training data"),
              "per_task": per_task, "mean_drop_rel_pct": mean, "held_out_seeds": held_out_seeds,
              "ood_split": split, "ood_split_seeds": over_seeds,
              "seeds": list(seeds), "paper": PAPER_OOD,
              "online": {"explore": explore, "alpha": alpha, "prior_weight": prior_weight, "grow_domains": grow_domains,
                         "spare_domains": spare_domains if grow_domains else 0,
                         "fast_fit": FAST_FIT if fast_fit else None},
              "drop_reduction_pct_points": _reductions(mean, over_seeds, modes),
              "seconds": time.time() - t_start}
    md = _ood_md(report)
    fig = plots.ood_fig(report, last, n_windows)
    report["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "out-of-domain", report, md, fig).items()}
    regret_png = Path(out_dir) / "out-of-domain-regret.png"
    plots.ood_regret_fig(report).savefig(regret_png, dpi=110)
    report["paths"]["regret_png"] = str(regret_png)
    return report


def _stream_modes(d: ExperimentData, router: Router, lam: float, stream: sim.Stream, world: sim.World,
                  x_eval: np.ndarray, eval_ds: Dataset, cap: float, q_ref: float, modes: Sequence[str],
                  config: sim.StreamConfig, beta: float, tau: float, alpha: float, label: str, progress: bool,
                  groups: dict[str, np.ndarray] | None = None, opts: dict | None = None,
                  stream_ds: Dataset | None = None) -> tuple[dict, dict]:
    """Stream through the router once per learning mode; evaluate each final state on eval_ds (no
    load): hull quality at `cap`, its change relative to q_ref, the point at lam (and, with `groups`,
    the point at lam on each group of eval rows). With stream_ds (the stream's queries), each
    stream's cumulative regret against the best fixed policy in hindsight (the router refitted with
    every LLM's outcome of the stream, routing it greedily). Returns ({mode: results}, {mode: StreamResult})."""
    out, runs = {}, {}
    best = None
    if stream_ds is not None:
        full = train.fill_arms(router.state, router.registry, stream.x, stream_ds, progress=progress)
        cols = offline_eval.offline_choices(full, router.registry, stream.x, stream_ds.prompt_tokens, stream_ds.models, [lam],
                                   0.0)[0]
        rows = np.arange(len(stream_ds))
        best = stream_ds.quality[rows, cols] - lam * stream_ds.cost[rows, cols]
    for mode in modes:
        learning, pol = mode_policy(mode, lam, beta, tau, alpha, (opts or {}).get("explore", "ucb"))
        res = sim.run_router(stream, world, router.state, router.registry, pol, config,
                             learning=learning, name=f"ood {label} {mode}", progress=progress)
        bonus = np.asarray(feedback_net.bonus(res.feedback_state, x_eval)) if learning == "binary" else None
        cws, pts = sweep(res.state, res.registry, x_eval, eval_ds, 0.0, [lam], bonus, d.reference)
        q = hull_at(pts, cap)
        out[mode] = {"quality_at_cap": q, "drop_rel_pct": rel_pct(q, q_ref), "best_point_at_cap": best_under(pts, cap),
                     "at_cost_weight": point_at(cws, pts, lam), "stream": res.summary()}
        if best is not None:
            out[mode]["regret"] = regret_curve(res, best, lam)
        if groups is not None:
            out[mode]["by_task"] = _by_task(res.state, res.registry, x_eval, eval_ds, lam, 0.0, groups, d.reference,
                                            bonus)
        if bonus is not None:
            out[mode]["feedback_bonus_mean_abs"] = float(np.abs(bonus[:, np.asarray(res.state.active)]).mean())
        runs[mode] = res
    return out, runs


def _by_task(state, registry, x: np.ndarray, ds: Dataset, lam: float, alpha: float, groups: dict[str, np.ndarray],
             reference: str, bonus: np.ndarray | None = None) -> dict:
    """{task: quality % and cost % of the reference, and mean quality x 100} of the choices at lam."""
    ch = offline_eval.offline_choices(state, registry, x, ds.prompt_tokens, ds.models, [lam], alpha, bonus)[0]
    out = {}
    for task, rows in groups.items():
        sub = ds.select(rows)
        p = offline_eval.points(ch[None, rows], sub, reference)[0]
        out[task] = dict(p, mean_quality=float(100 * sub.quality[np.arange(len(rows)), ch[rows]].mean()))
    return out


def _ood_split(d: ExperimentData, ind: Router, lam_in: float, world: sim.World, modes: Sequence[str],
               config: sim.StreamConfig, budget_pct: float, beta: float, tau: float, alpha: float, seed: int,
               stream_frac: float, progress: bool, d_ref: ExperimentData | None = None,
               opts: dict | None = None) -> tuple[dict, dict]:
    """The `ood` split protocol of `run_ood`: (report entry, {mode: StreamResult})."""
    if not 0.0 < stream_frac < 1.0:
        raise ValueError(f"ood_stream_frac must be in (0, 1), got {stream_frac!r}")
    keys = np.asarray(evaluate.task_keys(d.ood.tags), dtype=object)
    rng = np.random.default_rng(seed)
    s_parts, e_parts = [], []
    for task in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == task)
        rows = rows[rng.permutation(len(rows))]
        k = int(round(stream_frac * len(rows)))
        s_parts.append(rows[:k])
        e_parts.append(rows[k:])
    s_rows = np.concatenate(s_parts)
    s_rows = s_rows[rng.permutation(len(s_rows))]  # the ood tasks interleaved in the stream
    e_rows = np.sort(np.concatenate(e_parts))
    if not (len(s_rows) and len(e_rows)):
        raise ValueError(f"the ood split ({len(d.ood)} queries) is too small to stream and evaluate")
    ev = d.ood.select(e_rows)
    ev_keys = keys[e_rows]
    groups = {t: np.flatnonzero(ev_keys == t) for t in dict.fromkeys(ev_keys.tolist())}
    # the reference: a router that saw the stream queries offline, with every LLM's outcome
    seen_ds = concat([d.train, d.ood.select(s_rows)])
    seen_e = np.concatenate([d.e_train, d.e_ood[s_rows]])
    seen = fit_offline(seen_ds, seen_e, d_ref or d, progress=progress)
    lam_seen = calibrate(seen, router_features(seen, seen_e), seen_ds, budget_pct, 0.0, d.reference)
    x_seen = router_features(seen, d.e_ood[e_rows])
    cws, pts_seen = sweep(seen.state, seen.registry, x_seen, ev, 0.0, [lam_seen], reference=d.reference)
    cap = point_at(cws, pts_seen, lam_seen)["cost_pct"]
    q_seen = hull_at(pts_seen, cap)
    grow = (opts or {}).get("grow", False)
    x_stream, ind_eval, growth = _grown_features(ind, d.e_train, d.e_ood[s_rows], grow)
    stream = sim.make_stream(d.ood.select(s_rows), x_stream, config, d.reference)
    modes_out, runs = _stream_modes(d, ind, lam_in, stream, world, router_features(ind_eval, d.e_ood[e_rows]), ev, cap,
                                    q_seen, modes, config, beta, tau, alpha, OOD_SPLIT, progress, groups, opts,
                                    d.ood.select(s_rows))
    # context on the eval queries: the best single LLM (chosen on train) and the oracle, per task
    best = d.train.models[int(np.argmax(np.nanmean(d.train.quality, 0)))]
    singles = {task: {"best_single": float(100 * ev.quality[rows, ev.models.index(best)].mean()),
                      "oracle": float(100 * ev.quality[rows].max(1).mean())} for task, rows in groups.items()}
    split = {"tasks": list(groups), "n_stream": len(s_rows), "n_eval": len(e_rows), "stream_frac": stream_frac,
             "cost_cap_pct": cap, "cost_weight": lam_in, "best_single_llm": best, "eval_context": singles,
             "seen": {"cost_weight": lam_seen, "quality_at_cap": q_seen, "at_cost_weight": point_at(cws, pts_seen, lam_seen),
                      "by_task": _by_task(seen.state, seen.registry, x_seen, ev, lam_seen, alpha, groups, d.reference)},
             "modes": modes_out, "domains": growth.summary() if growth is not None else None}
    by = {"seen": split["seen"]["by_task"], **{m: modes_out[m]["by_task"] for m in modes}}
    split["mean_quality_over_tasks"] = {
        **{k: float(np.mean([v[t]["mean_quality"] for t in groups])) for k, v in by.items()},
        **{k: float(np.mean([singles[t][k] for t in groups])) for k in ("best_single", "oracle")}}
    return split, runs


def _grown_features(router: Router, e_train: np.ndarray, e_stream: np.ndarray, grow: bool):
    """(stream features [N, d], router for evaluation after the stream, DomainGrowth or None): with
    `grow`, domains open and move over the stream in arrival order (domains.DomainGrowth) and the
    evaluation router holds the grown centroids; else the router's own features."""
    if not grow:
        return router_features(router, e_stream), router, None
    growth = domains.DomainGrowth.from_router(router, e_train)
    x = growth.stream_features(router, e_stream)
    return x, growth.apply_to(router), growth


def _task_mean(entries: Sequence[dict], modes: Sequence[str]) -> dict:
    """One seed's held-out tasks as one entry for `_over_seeds`: each mode's quality and drop
    averaged over the tasks, its stream regrets summed."""
    out = {}
    for m in modes:
        regrets = [e["modes"][m].get("regret", {}).get("final") for e in entries]
        out[m] = {"quality_at_cap": float(np.mean([e["modes"][m]["quality_at_cap"] for e in entries])),
                  "drop_rel_pct": float(np.mean([e["modes"][m]["drop_rel_pct"] for e in entries])),
                  "regret": {"final": None if None in regrets else float(np.sum(regrets))}}
    return {"modes": out}


def _over_seeds(splits: Sequence[dict], seeds: Sequence[int], modes: Sequence[str]) -> dict:
    """A protocol's figures per seed and their means: {"seeds", "per_seed": [{mode: {quality_at_cap,
    drop_rel_pct, regret}}], "mean": {mode: the same, averaged}} (regret: the stream's final one)."""
    per_seed = [{m: {"quality_at_cap": s["modes"][m]["quality_at_cap"], "drop_rel_pct": s["modes"][m]["drop_rel_pct"],
                     "regret": s["modes"][m].get("regret", {}).get("final")} for m in modes} for s in splits]
    mean = {m: {k: (None if any(p[m][k] is None for p in per_seed) else float(np.mean([p[m][k] for p in per_seed])))
                for k in per_seed[0][m]} for m in modes}
    return {"seeds": list(seeds), "per_seed": per_seed, "mean": mean}


def _reductions(mean: dict, over_seeds: dict | None, modes: Sequence[str]) -> dict:
    """How many points each learning mode reduces the drop of no online learning by (held-out
    tasks' mean, and the ood split's mean over seeds): the paper's -5.44 -> -3.35 is 2.09 points."""
    out = {}
    for m in modes:
        if m == "none":
            continue
        if mean:
            out[f"held_out_{m}"] = mean[m] - mean["none"]
        if over_seeds is not None:
            ms = over_seeds["mean"]
            out[f"ood_split_{m}"] = ms[m]["drop_rel_pct"] - ms["none"]["drop_rel_pct"]
    return out


_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def _n(k: int) -> str:
    return _WORDS.get(k, str(k))


def _ood_md(r: dict) -> str:
    modes = r["modes"]
    n = len(r["tasks"])
    title = "train on two tasks, stream the third" if n == 3 else "stream tasks the router never saw"
    lines = [f"# out-of-domain: {title}", "", f"> {r['latency_note']}", "", data_note(r), ""]
    if r["per_task"]:
        lines += [
            "For each held-out task: the router is trained offline (full information) on the other "
            f"{_n(n - 1)} tasks' train queries, streams the held-out task's train queries at {r['config']['rate']:g} q/s "
            "learning as each mode says, and is evaluated on the held-out task's test queries. Quality: % of the "
            "reference on that task, the non-decreasing convex hull of the lambda sweep at the in-domain router's cost "
            f"there (the router trained on all {_n(n)} tasks, at its calibrated lambda); drop: relative to the in-domain "
            f"router's hull quality at that cap. The mean is over the {_n(n)} held-out tasks.", "",
            "| held-out task | stream / test queries | cost cap % | in-domain q% | "
            + " | ".join(f"{m}: q% (drop)" for m in modes) + " |", "| --- | --- | --- | --- |" + " --- |" * len(modes)]
        for e in r["per_task"]:
            lines.append(f"| {e['task']} | {e['n_stream']} / {e['n_test']} | {fmt(e['cost_cap_pct'])} | {fmt(e['in_domain']['quality_at_cap'])} | "
                         + " | ".join(f"{fmt(e['modes'][m]['quality_at_cap'])} ({fmt(e['modes'][m]['drop_rel_pct'], 2, True)}%)" for m in modes) + " |")
        lines.append("| mean | | | | " + " | ".join(f"({fmt(np.mean([e['modes'][m]['drop_rel_pct'] for e in r['per_task']]), 2, True)}%)"
                                                for m in modes) + " |")
        if len(r["seeds"]) > 1:
            lines += [""] + _seeds_md(r["held_out_seeds"], modes, "orders each held-out task's stream; stream regret: "
                                                                   "the tasks' sum")
        if r["skipped_tasks"]:
            lines += ["", f"Not held out (no test queries, or no other task): {', '.join(r['skipped_tasks'])}."]
    if r["ood_split"] is not None:
        lines += ([""] if r["per_task"] else []) + _ood_split_md(r["ood_split"], modes, r["config"]["rate"])
        if len(r["seeds"]) > 1:
            lines += [""] + _seeds_md(r["ood_split_seeds"], modes, "draws its own stream / evaluation halves and "
                                                                   "stream order")
    lines += ["", f"The paper: {r['paper']['none']:+.2f}% without online learning, {r['paper']['online']:+.2f}% with it "
              f"(the drop reduced by {r['paper']['online'] - r['paper']['none']:.2f} points)."]
    o = r["online"]
    lines += ["", f"Online learning: exploration `{o['explore']}` at alpha = {o['alpha']:g} posterior s.d.s, offline log "
              f"weight {o['prior_weight']:g}; domains grow: {o['grow_domains']} ({o['spare_domains']} spare slots). "
              "Drop reduced by (points, relative to no online learning): "
              + (", ".join(f"{k} {v:+.2f}" for k, v in r["drop_reduction_pct_points"].items()) or "-") + "."]
    streams = [(e["task"], e["modes"]) for e in r["per_task"]]
    if r["ood_split"] is not None:
        streams.append((OOD_SPLIT, r["ood_split"]["modes"]))
    if any("regret" in ms[m] for _, ms in streams for m in ms):
        lines += ["", "Cumulative regret of each stream against the best fixed policy in hindsight (the router refitted "
                  "with every LLM's outcome of the stream; reward = logged quality - lambda * cost; lower is better):", "",
                  "| stream | " + " | ".join(modes) + " |", "| --- |" + " --- |" * len(modes)]
        for label, ms in streams:
            lines.append(f"| {label} | " + " | ".join(fmt(ms[m].get("regret", {}).get("final"), 1) for m in modes) + " |")
    opened = [(e["task"], e["domains"]) for e in r["per_task"] if e.get("domains")]
    if r["ood_split"] is not None and r["ood_split"].get("domains"):
        opened.append((OOD_SPLIT, r["ood_split"]["domains"]))
    for label, g in opened:
        lines.append(f"- {label}: {g['opened']} domain(s) opened (cosine threshold {g['threshold']:.3f}); queries per "
                     f"opened domain {g['queries_per_opened_domain']}; opened at stream queries "
                     f"{[o['at'] for o in g['opened_at']]}")
    return "\n".join(lines)


def _seeds_md(o: dict, modes: Sequence[str], what: str) -> list[str]:
    """A protocol over seeds: each mode's drop, its reduction and its stream regret (mean, per seed)."""
    seeds = ", ".join(map(str, o["seeds"]))
    none = o["mean"]["none"]["drop_rel_pct"]
    lines = [f"Over seeds {seeds} (each {what}; the table above is seed {o['seeds'][0]}'s): mean, then per seed.", "",
             "| mode | drop % vs seen | drop reduced by (points) | stream regret |", "| --- | --- | --- | --- |"]
    for m in modes:
        mean, per = o["mean"][m], [p[m] for p in o["per_seed"]]
        red = "" if m == "none" or none is None or mean["drop_rel_pct"] is None else fmt(mean["drop_rel_pct"] - none, 2, True)
        lines.append(f"| {m} | {fmt(mean['drop_rel_pct'], 2, True)} ({', '.join(fmt(p['drop_rel_pct'], 2, True) for p in per)}) "
                     f"| {red} | {fmt(mean['regret'], 1)} ({', '.join(fmt(p['regret'], 1) for p in per)}) |")
    return lines


def _ood_split_md(s: dict, modes: Sequence[str], rate: float) -> list[str]:
    lines = ["## The data's `ood` split: tasks never seen in train", "",
             f"The router trained on every train query streams {s['stream_frac']:.0%} of each ood task's queries "
             f"({s['n_stream']}, the tasks interleaved) at {rate:g} q/s, learning as each mode says, and is evaluated "
             f"on the other {s['n_eval']}. `seen`: a router trained offline (full information) on train plus the "
             "stream queries, at its calibrated lambda; the cost cap is its cost on the evaluation queries, quality "
             "the hull of the lambda sweep at that cap (% of the reference) and drop relative to `seen`.", "",
             "| tasks | stream / eval queries | cost cap % | seen q% | " + " | ".join(f"{m}: q% (drop)" for m in modes)
             + " |", "| --- | --- | --- | --- |" + " --- |" * len(modes),
             f"| {', '.join(s['tasks'])} | {s['n_stream']} / {s['n_eval']} | {fmt(s['cost_cap_pct'])} | "
             f"{fmt(s['seen']['quality_at_cap'])} | " + " | ".join(
                 f"{fmt(s['modes'][m]['quality_at_cap'])} ({fmt(s['modes'][m]['drop_rel_pct'], 2, True)}%)" for m in modes)
             + " |", "",
             f"Mean quality x 100 per ood task at each router's cost weight (best single LLM on train: "
             f"{s['best_single_llm']}):", "",
             "| ood task | seen | " + " | ".join(modes) + " | best single | oracle |",
             "| --- | --- |" + " --- |" * len(modes) + " --- | --- |"]
    keys = ["seen", *modes, "best_single", "oracle"]
    for t in s["tasks"]:
        by = {"seen": s["seen"]["by_task"][t], **{m: s["modes"][m]["by_task"][t] for m in modes}}
        vals = [by[k]["mean_quality"] for k in keys[:-2]] + [s["eval_context"][t][k] for k in keys[-2:]]
        lines.append(f"| {t} | " + " | ".join(fmt(v) for v in vals) + " |")
    lines.append("| mean over tasks | " + " | ".join(fmt(s["mean_quality_over_tasks"][k]) for k in keys) + " |")
    return lines

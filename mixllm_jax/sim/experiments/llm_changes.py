"""A changing set of LLMs: LLMs added, removed and repriced while the stream runs, with no recompilation."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from mixllm_jax.sim import events as events_mod, simulate as sim
from mixllm_jax.data import Dataset
from mixllm_jax.sim.experiments import plots
from mixllm_jax.sim.experiments.common import (BUDGET_PCT, ONLINE_ALPHA, STREAM_BETA, STREAM_TAU, ExperimentData, calibrate,
                                           calibration_note, concat, config_dict, data_note, fit_offline, fmt,
                                           router_features, select_models, short, split_idx, stream_policy,
                                           write_outputs)

DEFAULT_ADDED = ("zero-one-ai/Yi-34B-Chat", "mistralai/mixtral-8x7b-chat", "claude-v2")
DEFAULT_REMOVED = "gpt-3.5-turbo-1106"


def default_changes(ds: Dataset, reference: str) -> tuple[list[str], str]:
    """(added, removed) LLMs of the experiment on `ds`: DEFAULT_ADDED and DEFAULT_REMOVED where the
    data has them (RouterBench), else chosen from the data: the LLMs other than the reference,
    best mean quality on ds first; the best min(3, M - 3) join mid-stream (the best first: the one
    that should win traffic, and is repriced) and the best of the rest is removed."""
    if all(m in ds.models and m != reference for m in [*DEFAULT_ADDED, DEFAULT_REMOVED]):
        return list(DEFAULT_ADDED), DEFAULT_REMOVED
    if len(ds.models) < 4:
        raise ValueError(f"llm-changes needs at least 4 LLMs (the reference, one to remove, one to keep, one "
                         f"to add); the data has {len(ds.models)}")
    mean_q = np.nanmean(ds.quality, 0)
    others = sorted((m for m in ds.models if m != reference), key=lambda m: -mean_q[ds.models.index(m)])
    k = min(3, len(ds.models) - 3)
    return others[:k], others[k]


def run_llm_changes(d: ExperimentData, out_dir, *, added: Sequence[str] | None = None,
                    removed: str | None = None, repriced: str | None = None, price_factor: float = 10.0,
                    at: tuple[float, float, float] = (0.2, 0.45, 0.7), frac_offline: float = 0.3,
                    prior: str | float = "mean", seed: int = 0, config: sim.StreamConfig = sim.StreamConfig(),
                    budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA, tau: float = STREAM_TAU,
                    alpha: float = ONLINE_ALPHA, n_windows: int = 25, progress: bool = True) -> dict:
    """Train offline (frac_offline of d.train) on every LLM but `added`; stream the rest of d.train
    and d.test (shuffled) with refined feedback; at fractions `at` of the stream add `added` (cold
    start from `prior`), remove `removed`, and multiply `repriced`'s prices (default added[0]) by
    price_factor. Compared with the same router without online learning and with a router that had
    every LLM from the start (same removal and price change). added / removed None: see
    `default_changes`; the reference LLM must stay (it is the 100% of every figure)."""
    t_start = time.time()
    if added is None or removed is None:
        auto_added, auto_removed = default_changes(d.train, d.reference)
        added = auto_added if added is None else added
        removed = auto_removed if removed is None else removed
    repriced = repriced or added[0]
    models = list(d.train.models)
    initial = [m for m in models if m not in added]
    missing = [m for m in [*added, removed, repriced] if m not in models]
    if missing:
        raise ValueError(f"models {missing} are not in the data ({models})")
    if removed not in initial:
        raise ValueError(f"the removed LLM {removed!r} must be one of the initial LLMs")
    if d.reference not in initial or d.reference == removed:
        raise ValueError(f"the reference LLM {d.reference!r} must be an initial LLM that is not removed")
    off_i, on_i = split_idx(len(d.train), frac_offline, seed)
    off = d.train.select(off_i)
    rng = np.random.default_rng(seed + 1)
    stream_ds = concat([d.train.select(on_i), d.test])
    e_stream = np.concatenate([d.e_train[on_i], d.e_test])
    perm = rng.permutation(len(stream_ds))
    stream_ds, e_stream = stream_ds.select(perm), e_stream[perm]
    capacity = 1 << max(1, (len(models) - 1).bit_length())
    router = fit_offline(select_models(off, initial), d.e_train[off_i], d, capacity=capacity, progress=progress)
    router_all = fit_offline(off, d.e_train[off_i], d, capacity=capacity, progress=progress)
    x_off = router_features(router, d.e_train[off_i])
    lam = calibrate(router, x_off, select_models(off, initial), budget_pct, alpha, d.reference)
    world = sim.World.from_specs(d.train.specs)
    stream = sim.make_stream(stream_ds, router_features(router, e_stream), config, d.reference)
    stream_all = dataclasses.replace(stream, x=router_features(router_all, e_stream))
    n = len(stream)
    t_add, t_rm, t_price = (int(round(f * n)) for f in at)
    r = world.index(repriced)
    price = events_mod.SetPrice(t_price, repriced, world.price_in[r] * 1e6 * price_factor, world.price_out[r] * 1e6 * price_factor)
    events = [*(events_mod.AddLLM(t_add, m, prior) for m in added), events_mod.RemoveLLM(t_rm, removed), price]
    pol = stream_policy(lam, beta, tau, alpha)
    runs = {
        "adaptive": sim.run_router(stream, world, router.state, router.registry, pol, config, learning="refined",
                                   events=events, name="adaptive", progress=progress),
        "adaptive_no_learning": sim.run_router(stream, world, router.state, router.registry, pol, config,
                                               learning="none", events=events, name="no learning", progress=progress),
        "all_llms_from_start": sim.run_router(stream_all, world, router_all.state, router_all.registry, pol, config,
                                              learning="refined", events=[events[-2], events[-1]], name="all LLMs",
                                              progress=progress),
    }
    # the rows where the events took effect (the start of the routing window holding each `at`)
    row_of = {(e["event"], e["name"]): e["row"] for e in runs["adaptive"].info["events"]}
    t_add, t_rm, t_price = row_of[("AddLLM", added[0])], row_of[("RemoveLLM", removed)], row_of[("SetPrice", repriced)]
    bounds = [0, t_add, t_rm, t_price, n]
    phase_names = ["initial LLMs", f"after adding {len(added)}", f"after removing {short(removed)}",
                   f"after {short(repriced)} x{price_factor:g} price"]
    phases = {}
    for k, res in runs.items():
        phases[k] = []
        for name, a, b in zip(phase_names, bounds[:-1], bounds[1:]):
            half = (a + b) // 2
            phases[k].append({"phase": name, "rows": [a, b], "all": res.summary(np.arange(a, b)),
                              "second_half": res.summary(np.arange(half, b))})
    ad = runs["adaptive"]
    good = added[0]
    gi = world.index(good)
    in_phase = lambda res, a, b, m: float((res.model[a:b] == m).mean())  # noqa: E731
    q = [(bounds[1] + (bounds[2] - bounds[1]) * i // 4, bounds[1] + (bounds[2] - bounds[1]) * (i + 1) // 4) for i in range(4)]
    ev_compiles = [e["compiles_before"] for e in ad.info["events"]]
    end = ad.info["compiles"]["end"]
    checks = {
        "recompiles_after_first_event": {k: end[k] - ev_compiles[0][k] for k in end} if ev_compiles else None,
        "no_recompilation": bool(ev_compiles) and all(end[k] == ev_compiles[0][k] for k in ("route_batch", "update_batch", "serve")),
        "removed_share_after_removal": {k: in_phase(res, t_rm, n, world.index(removed)) for k, res in runs.items()},
        "removed_share_before_removal": in_phase(ad, t_add, t_rm, world.index(removed)),
        "new_llm": good,
        "new_llm_share_by_quarter_after_add": [in_phase(ad, a, b, gi) for a, b in q],
        "new_llm_share_by_quarter_after_add_no_learning": [in_phase(runs["adaptive_no_learning"], a, b, gi) for a, b in q],
        "new_llm_share_after_removal": {k: in_phase(res, t_rm, t_price, gi) for k, res in runs.items()},
        "repriced": repriced,
        "repriced_share_before_price_change": in_phase(ad, t_rm, t_price, r),
        "repriced_share_after_price_change": in_phase(ad, t_price, n, r),
        "added_llms_share_after_add": {m: in_phase(ad, t_add, n, world.index(m)) for m in added},
    }
    checks["new_llm_share_grows"] = checks["new_llm_share_by_quarter_after_add"][-1] > checks["new_llm_share_by_quarter_after_add"][0]
    checks["nothing_routed_to_removed"] = all(v == 0.0 for v in checks["removed_share_after_removal"].values())
    checks["price_change_moves_traffic"] = checks["repriced_share_after_price_change"] < checks["repriced_share_before_price_change"]
    report = {"experiment": "llm-changes", "latency_note": sim.LATENCY_NOTE, "reference": d.reference, "data": d.info(),
              "features": d.features, "config": config_dict(config), "n_offline": len(off), "n_stream": n,
              "initial": initial, "added": list(added), "removed": removed, "repriced": repriced,
              "price_factor": price_factor, "prior": prior, "cost_weight": lam,
              "cost_weight_from": calibration_note(d, budget_pct, "the offline part"),
              "events": ad.info["events"], "event_rows": {"add": t_add, "remove": t_rm, "price": t_price},
              "phases": phases, "checks": checks, "compiles": {k: v.info["compiles"] for k, v in runs.items()},
              "timeline": {k: v.timeline(n_windows) for k, v in runs.items()}, "seconds": time.time() - t_start}
    md = _changes_md(report)
    ev_t = [(stream.arrival[t_add], f"+{len(added)} LLMs"), (stream.arrival[t_rm], f"-{short(removed)}"),
            (stream.arrival[min(t_price, n - 1)], f"{short(repriced)} x{price_factor:g}")]
    fig = plots.changes_fig(report, runs, n_windows, ev_t, gi)
    report["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "llm-changes", report, md, fig).items()}
    return report


def _changes_md(r: dict) -> str:
    c = r["checks"]
    lines = ["# llm-changes: LLMs added, removed and repriced mid-stream", "", f"> {r['latency_note']}", "",
             data_note(r), "",
             f"Offline: {r['n_offline']} train queries with the {len(r['initial'])} initial LLMs (full information). "
             f"Stream: {r['n_stream']} queries (rest of train + test, shuffled) at {r['config']['rate']:g} q/s with "
             f"refined feedback. At query {r['event_rows']['add']} add " + ", ".join(short(m) for m in r["added"]) +
             f" (cold start, prior `{r['prior']}`); at {r['event_rows']['remove']} remove {short(r['removed'])}; at "
             f"{r['event_rows']['price']} multiply {short(r['repriced'])}'s prices by {r['price_factor']:g} (router told; "
             "no retraining). `adaptive_no_learning`: same events, no online learning; `all_llms_from_start`: trained "
             "offline with every LLM, same removal and price change.", "",
             "## Checks", "",
             f"- recompilations after the first event (compile counters): {c['recompiles_after_first_event']} -> "
             f"no recompilation: **{c['no_recompilation']}**",
             f"- share of {short(r['removed'])} before removal {c['removed_share_before_removal']:.3f}, after: "
             + ", ".join(f"{k} {v:.3f}" for k, v in c["removed_share_after_removal"].items())
             + f" -> nothing routed to it: **{c['nothing_routed_to_removed']}**",
             f"- share of the new {short(c['new_llm'])} by quarter after its addition: "
             + ", ".join(f"{v:.3f}" for v in c["new_llm_share_by_quarter_after_add"])
             + f" (no learning: " + ", ".join(f"{v:.3f}" for v in c["new_llm_share_by_quarter_after_add_no_learning"])
             + f") -> grows: **{c['new_llm_share_grows']}**; after the removal of {short(r['removed'])}: "
             + ", ".join(f"{k} {v:.3f}" for k, v in c["new_llm_share_after_removal"].items()),
             f"- share of {short(c['repriced'])}: {c['repriced_share_before_price_change']:.3f} before the price change, "
             f"{c['repriced_share_after_price_change']:.3f} after -> traffic moves: **{c['price_change_moves_traffic']}**",
             "", "## Quality and cost by phase (% of the reference's logged totals; second half of each phase in brackets)", "",
             "| phase | " + " | ".join(f"{k} q% (2nd half)" for k in r["phases"]) + " | "
             + " | ".join(f"{k} cost% (2nd half)" for k in r["phases"]) + " |",
             "| --- |" + " --- |" * (2 * len(r["phases"]))]
    keys = list(r["phases"])
    for i, ph in enumerate(r["phases"][keys[0]]):
        qs = [f"{fmt(r['phases'][k][i]['all']['quality_pct'])} ({fmt(r['phases'][k][i]['second_half']['quality_pct'])})" for k in keys]
        cs = [f"{fmt(r['phases'][k][i]['all']['cost_pct'])} ({fmt(r['phases'][k][i]['second_half']['cost_pct'])})" for k in keys]
        lines.append(f"| {ph['phase']} | " + " | ".join(qs) + " | " + " | ".join(cs) + " |")
    lines += ["", "## Traffic share of the adaptive router by phase", "",
              "| phase | " + " | ".join(short(m) for m in r["initial"] + r["added"]) + " |",
              "| --- |" + " --- |" * (len(r["initial"]) + len(r["added"]))]
    for ph in r["phases"]["adaptive"]:
        lines.append(f"| {ph['phase']} | " + " | ".join(f"{ph['all']['share'].get(m, 0.0):.3f}"
                                                        for m in r["initial"] + r["added"]) + " |")
    return "\n".join(lines)

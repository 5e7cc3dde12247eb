"""The paper's deployment experiments, each one command writing NAME.json, NAME.md and NAME.png.

    run_experiment("latency", out_dir)        routing under load: penalty vs none vs baselines
    run_experiment("continual", out_dir)      offline:online 80:20 / 50:50 / 30:70, no / refined / binary
    run_experiment("llm-changes", out_dir)    LLMs added, removed and repriced while the stream runs
    run_experiment("out-of-domain", out_dir)  train on two RouterBench tasks, stream the third

`simulate_main(...)` is one latency run at one load (the `mixllm-jax simulate` command).
Everything is on the RouterBench slice by default (train split to train and stream, test split to
evaluate), with cached encoder embeddings (max_length 128, left truncation) and the tag-enhanced
features; `quick=True` runs a small subset on one-hot task features (no encoder: seconds, for tests).

Protocols (the paper's Table 1 setup is described only briefly; these are our choices):
* A router's operating point is a cost weight lambda, calibrated on its own offline training data
  to the paper's 24.18% of GPT-4's cost (the smallest lambda of `evaluate.COST_WEIGHTS` at or under
  it), unless given.
* "Quality at equal or lower cost": on the test split, every method's lambda sweep (no load) gives
  achieved points; a method's quality is its best achieved quality at cost <= a shared cap (the
  no-online router's cost at its lambda for `continual`; the in-domain router's for
  `out-of-domain`), so no variant wins by spending more.
* Streams arrive at 10 queries/s (the paper's 100 per 10 s) unless said otherwise; latency profiles
  of RouterBench's LLMs are ASSUMPTIONS (see `simulate.LATENCY_NOTE`), stated in every output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax import data as data_mod
from mixllm_jax import evaluate, feedback, metrics, simulate as sim, tags, train
from mixllm_jax.data import Dataset
from mixllm_jax.policy import Policy
from mixllm_jax.router import Router
from mixllm_jax.state import ArmRegistry, grow

EXPERIMENTS = ("latency", "continual", "llm-changes", "out-of-domain")
REFERENCE = sim.REFERENCE
BUDGET_PCT = evaluate.PAPER_BUDGET_PCT
PAPER_TABLE1 = {"refined": {0.8: 1.21, 0.5: 1.39, 0.3: 2.22}, "binary": {0.8: 0.52, 0.5: 0.53, 0.3: 1.31}}
PAPER_OOD = {"none": -5.44, "online": -3.35}
STREAM_BETA, STREAM_TAU, STREAM_ALPHA = 0.1, 10.0, 0.01
"""The stream router's latency penalty: the paper's beta = 0.1, with the penalty starting at 10 s
(a third of the 30 s tolerance: the router's load view is up to one 10 s refresh old, so a penalty
that starts only at the tolerance reacts after queries already time out; see the latency table)."""


# ----------------------------------------------------------------------------------------------
# Data and shared helpers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentData:
    """Train / test datasets with their encoder embeddings (or stand-in features) and how to train."""

    train: Dataset
    test: Dataset
    e_train: np.ndarray  # [N_train, H]
    e_test: np.ndarray  # [N_test, H]
    head_config: tags.HeadConfig | None = tags.HeadConfig()
    feature_mode: str = "raw+domain"
    max_length: int = 128
    features: str = "encoder"  # "encoder" | "onehot" (for the notes)


def onehot_features(*datasets: Dataset) -> list[np.ndarray]:
    """One-hot of each query's task over the tasks of all the datasets: stand-in features for quick runs."""
    keys = [evaluate.task_keys(d.tags) for d in datasets]
    names = list(dict.fromkeys(k for ks in keys for k in ks))
    return [np.eye(len(names), dtype=np.float32)[[names.index(k) for k in ks]] for ks in keys]


def load_data(quick: bool = False, *, features: str | None = None, max_length: int = 128,
              quick_rows: tuple[int, int] = (360, 180), seed: int = 0, data_dir=None,
              encoder_name=None, progress: bool = True) -> ExperimentData:
    """The RouterBench slice (train and test splits) with features.

    features "encoder" (default; quick: "onehot"): cached embeddings of the default encoder at
    `max_length` (left truncation) and the tag-enhanced head; "onehot": the task's one-hot, no head
    (a routing-by-task stand-in that needs no encoder). quick keeps a random `quick_rows` subset.
    """
    features = features or ("onehot" if quick else "encoder")
    if features not in ("encoder", "onehot"):
        raise ValueError(f"features must be 'encoder' or 'onehot', got {features!r}")
    tr = data_mod.load_routerbench(data_dir, split="train")
    te = data_mod.load_routerbench(data_dir, split="test")
    if quick:
        rng = np.random.default_rng(seed)
        tr = tr.select(np.sort(rng.permutation(len(tr))[: quick_rows[0]]))
        te = te.select(np.sort(rng.permutation(len(te))[: quick_rows[1]]))
    if features == "onehot":
        e_tr, e_te = onehot_features(tr, te)
        return ExperimentData(tr, te, e_tr, e_te, head_config=None, feature_mode="raw",
                              max_length=max_length, features="onehot")
    from mixllm_jax import encoder

    enc = encoder.load_encoder(encoder_name)
    e_tr = train.embed(enc, tr, max_length=max_length, progress=progress)
    e_te = train.embed(enc, te, max_length=max_length, progress=progress)
    return ExperimentData(tr, te, e_tr, e_te, max_length=max_length, features="encoder")


def select_models(ds: Dataset, names: Sequence[str]) -> Dataset:
    """The same queries with only the LLM columns `names` (in that order)."""
    idx = [ds.models.index(n) for n in names]
    return dataclasses.replace(
        ds, models=list(names), quality=ds.quality[:, idx], cost=ds.cost[:, idx],
        completion_tokens=ds.completion_tokens[:, idx],
        latency_s=None if ds.latency_s is None else ds.latency_s[:, idx],
        specs=None if ds.specs is None else [ds.specs[i] for i in idx])


def _train(ds: Dataset, e: np.ndarray, d: ExperimentData, capacity: int | None = None,
           progress: bool = True) -> Router:
    """Full-information offline training (train.train_router) on cached embeddings, no encoder."""
    router = train.train_router(ds, ds.specs, None, head_config=d.head_config, max_length=d.max_length,
                                feature_mode=d.feature_mode, embeddings=e, progress=progress)
    if capacity is not None and capacity > router.state.capacity:  # room for LLMs added later
        router.state = grow(router.state, capacity)
        reg = ArmRegistry.from_dict(router.registry.to_dict())
        reg.capacity = capacity
        router.registry = reg
    return router


def _x(router: Router, e: np.ndarray) -> np.ndarray:
    return np.asarray(router.embed_features(e))


def _sweep(state, registry, x, ds: Dataset, alpha: float, extra_weights=(), bonus=None) -> tuple[list, list]:
    """(cost weights, points) of a no-load lambda sweep of a router state on ds."""
    cws = sorted(set(map(float, evaluate.COST_WEIGHTS)) | set(map(float, extra_weights)))
    ch = sim.offline_choices(state, registry, x, ds.prompt_tokens, ds.models, cws, alpha, bonus)
    return cws, sim.points(ch, ds)


def _calibrate(router: Router, x: np.ndarray, ds: Dataset, budget_pct: float, alpha: float) -> float:
    cws, pts = _sweep(router.state, router.registry, x, ds, alpha)
    return sim.calibrate_cost_weight(pts, cws, budget_pct)


def _at(cws, pts, lam) -> dict:
    return pts[cws.index(float(lam))]


def _best_under(pts, cap) -> float:
    return metrics.best_quality_under_cost([p["cost_pct"] for p in pts], [p["quality_pct"] for p in pts],
                                           cap * (1 + 1e-9) + 1e-12)


def _order(n: int, seed: int, repeat: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(repeat)])


def _split_idx(n: int, frac_offline: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Offline rows (sorted) and online rows (random stream order), as data.split_offline_online."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(frac_offline * n))
    return np.sort(perm[:k]), perm[k:]


def _policy(lam, beta=STREAM_BETA, tau=STREAM_TAU, alpha=STREAM_ALPHA) -> Policy:
    return Policy(cost_weight=float(lam), alpha=float(alpha), beta=float(beta), tau=float(tau), in_batch_load=True)


def _rel(a, b) -> float | None:
    """Relative change of a over b, in %."""
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return float(100.0 * (a - b) / b)


def _clean(o):
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    return o


def _f(v, nd=2, signed=False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def _short(name: str) -> str:
    return name.split("/")[-1]


def _config_dict(c: sim.StreamConfig) -> dict:
    return dataclasses.asdict(c)


def _write(out_dir, name: str, report: dict, md: str, fig) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    report = dict(report, files={k: str(v) for k, v in paths.items()})
    paths["json"].write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(md.rstrip() + f"\n\n![{name}]({name}.png)\n")
    fig.savefig(paths["png"], dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return paths


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _mid(tl: list[dict]) -> np.ndarray:
    return np.array([(w["t0"] + w["t1"]) / 2 for w in tl])


def _share_plot(ax, res: sim.StreamResult, n_windows: int, title: str, events=()):
    tl = res.timeline(n_windows)
    t = _mid(tl)
    names = [m for m in res.stream.models if any(w["share"].get(m, 0) > 0 for w in tl)]
    ys = np.array([[w["share"].get(m, 0.0) for w in tl] for m in names])
    ax.stackplot(t, ys, labels=[_short(m) for m in names], alpha=0.85)
    for ev_t, label in events:
        ax.axvline(ev_t, color="black", ls=":", lw=1)
        ax.text(ev_t, 0.98, " " + label, fontsize=7, ha="left", va="top", transform=ax.get_xaxis_transform(),
                bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})
    ax.set_xlim(t[0], t[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("traffic share")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _line_plot(ax, results: dict[str, sim.StreamResult], key: str, n_windows: int, ylabel: str, title: str, events=()):
    for label, res in results.items():
        tl = res.timeline(n_windows)
        ax.plot(_mid(tl), [w[key] if w[key] is not None else np.nan for w in tl], marker=".", label=label)
    for ev_t, _ in events:
        ax.axvline(ev_t, color="black", ls=":", lw=1)
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# ----------------------------------------------------------------------------------------------
# Latency: the router under load vs no penalty and the baselines
# ----------------------------------------------------------------------------------------------


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
        router = _train(d.train, d.e_train, d, progress=progress)
    x_tr = _x(router, d.e_train)
    x_te = _x(router, d.e_test) if x_test is None else np.asarray(x_test)
    lam = _calibrate(router, x_tr, d.train, budget_pct, alpha) if cost_weight is None else float(cost_weight)
    order = _order(len(d.test), config.seed, repeat)
    ds = d.test.select(order)
    x = x_te[order]
    world = sim.World.from_specs(d.test.specs)
    # unconstrained: the same router at the same lambda with no load and no deadline
    unc = sim.points(sim.offline_choices(router.state, router.registry, x, ds.prompt_tokens, ds.models, [lam], alpha), ds)[0]
    chains = {"cascade_frontier": list(cascade) if cascade else sim.frontier_chain(d.train),
              "cascade_cheap_to_ref": [sim.frontier_chain(d.train)[0], REFERENCE]}
    per_rate, results_by_rate = [], {}
    for rate in rates:
        cfg = dataclasses.replace(config, rate=float(rate))
        stream = sim.make_stream(ds, x, cfg)
        res = {
            "mixllm": sim.run_router(stream, world, router.state, router.registry, _policy(lam, beta, tau, alpha), cfg,
                                     name="mixllm", progress=progress),
            "mixllm_no_penalty": sim.run_router(stream, world, router.state, router.registry,
                                                _policy(lam, 0.0, tau, alpha), cfg, name="mixllm_no_penalty",
                                                progress=progress),
            # the penalty on one load snapshot per window: every query of a window sees the same waits
            "mixllm_snapshot_herding": sim.run_router(
                stream, world, router.state, router.registry,
                dataclasses.replace(_policy(lam, beta, tau, alpha), in_batch_load=False), cfg,
                name="mixllm_snapshot_herding", progress=progress),
        }
        for cname, chain in chains.items():
            res[cname] = sim.run_cascade(stream, world, chain, cfg, name=cname)
        res["random"] = sim.run_random(stream, world, cfg)
        if singles:
            for m in world.models:
                res[m] = sim.run_single(stream, world, m, cfg)
        summ = {k: r.summary() for k, r in res.items()}
        for k, r in res.items():
            if k.startswith("cascade"):
                summ[k]["chain"] = chains[k]
        q_pen = summ["mixllm"]["quality_pct"]
        acc = {"mixllm_vs_unconstrained_rel_pct": _rel(q_pen, unc["quality_pct"]),
               "mixllm_within_1pct": bool(_rel(q_pen, unc["quality_pct"]) >= -1.0),
               "no_penalty_vs_unconstrained_rel_pct": _rel(summ["mixllm_no_penalty"]["quality_pct"], unc["quality_pct"])}
        for cname in chains:
            acc[f"{cname}_deadline_drop_rel_pct"] = _rel(summ[cname]["quality_pct"], summ[cname]["quality_pct_no_deadline"])
        per_rate.append({"rate": float(rate), "duration_s": float(stream.arrival[-1]), "methods": summ,
                         "acceptance": acc,
                         "mixllm_compiles": res["mixllm"].info["compiles"]})
        results_by_rate[float(rate)] = res
    report = {
        "experiment": name, "latency_note": sim.LATENCY_NOTE, "reference": REFERENCE,
        "n_stream_queries": len(ds), "test_queries": len(d.test), "repeat": repeat, "features": d.features,
        "config": _config_dict(config), "rates": list(map(float, rates)),
        "policy": {"cost_weight": lam, "beta": beta, "tau": tau, "alpha": alpha,
                   "cost_weight_from": "given" if cost_weight is not None else f"calibrated on train to {budget_pct}% cost"},
        "unconstrained": unc, "cascades": chains, "per_rate": per_rate,
        "seconds": time.time() - t_start,
    }
    md = _latency_md(report)
    fig = _latency_fig(report, results_by_rate, n_windows)
    report["paths"] = {k: str(v) for k, v in _write(out_dir, name, report, md, fig).items()}
    return report


def _latency_md(r: dict) -> str:
    pol = r["policy"]
    lines = [f"# {r['experiment']}: routing under load ({r['n_stream_queries']} queries: the test split x{r['repeat']}, shuffled)",
             "", f"> {r['latency_note']}", "",
             f"Router: cost weight {pol['cost_weight']:.4g} ({pol['cost_weight_from']}), alpha {pol['alpha']}, "
             f"latency penalty beta {pol['beta']} starting at tau = {pol['tau']} s; `mixllm_no_penalty` is the same "
             f"router with beta = 0; `mixllm_snapshot_herding` keeps the penalty but scores each routing window against one load "
             f"snapshot (no in-batch load: the window's queries herd). Queries score quality 0 past the {r['config']['tolerance_s']} s tolerance; satisfied = "
             f"quality > {r['config']['satisfied_quality']} and wait < {r['config']['satisfied_wait_s']} s. Load snapshot "
             f"refreshed every {r['config']['refresh_s']} s; routing windows of {r['config']['batch_s']} s. Quality and cost "
             f"are % of {r['reference']}'s logged totals on the same queries. Unconstrained (no load, no deadline, same "
             f"cost weight): quality {r['unconstrained']['quality_pct']:.2f}%, cost {r['unconstrained']['cost_pct']:.2f}%.",
             "", "Cascades (escalate while the answer's quality < 0.7): " +
             "; ".join(f"`{k}` = {' > '.join(_short(m) for m in v)}" for k, v in r["cascades"].items()) +
             ". The cascade observes each answer's true logged quality (RouterBench scores are 0/1 correctness) "
             "before deciding to escalate, a verifier no deployed cascade has: its no-deadline quality is an "
             "optimistic bound, and can exceed the reference's.", ""]
    lines += ["## Acceptance", "", "| rate (q/s) | mixllm q% (30 s) | vs unconstrained | no-penalty q% (30 s) | vs unconstrained | "
              + " | ".join(f"{k} drop from deadline" for k in r["cascades"]) + " |",
              "| --- |" + " --- |" * (4 + len(r["cascades"]))]
    for pr in r["per_rate"]:
        a, m = pr["acceptance"], pr["methods"]
        lines.append(f"| {pr['rate']:g} | {_f(m['mixllm']['quality_pct'])} | {_f(a['mixllm_vs_unconstrained_rel_pct'], 2, True)}% | "
                     f"{_f(m['mixllm_no_penalty']['quality_pct'])} | {_f(a['no_penalty_vs_unconstrained_rel_pct'], 2, True)}% | "
                     + " | ".join(f"{_f(a[f'{k}_deadline_drop_rel_pct'], 2, True)}%" for k in r["cascades"]) + " |")
    for pr in r["per_rate"]:
        lines += ["", f"## {pr['rate']:g} queries/s ({pr['duration_s']:.0f} s of stream)", "",
                  "| method | quality% (30 s deadline) | quality% (no deadline) | cost% | mean wait s | p95 wait s | timeouts % | satisfied % | calls/query |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, s in pr["methods"].items():
            lines.append(f"| {_short(k)} | {_f(s['quality_pct'])} | {_f(s['quality_pct_no_deadline'])} | {_f(s['cost_pct'])} | "
                         f"{_f(s['mean_wait_s'], 1)} | {_f(s['p95_wait_s'], 1)} | {_f(s['timeout_pct'], 1)} | "
                         f"{_f(s['satisfaction_pct'], 1)} | {_f(s['mean_calls'], 2)} |")
    return "\n".join(lines)


def _latency_fig(r: dict, results_by_rate: dict, n_windows: int):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    rates = [pr["rate"] for pr in r["per_rate"]]
    keys = ["mixllm", "mixllm_no_penalty", "mixllm_snapshot_herding", *r["cascades"], "random"]
    for k in keys:
        axes[0, 0].plot(rates, [pr["methods"][k]["quality_pct"] for pr in r["per_rate"]], marker="o", label=k)
        axes[0, 1].plot(rates, [pr["methods"][k]["p95_wait_s"] for pr in r["per_rate"]], marker="o", label=k)
    axes[0, 0].axhline(r["unconstrained"]["quality_pct"], color="gray", ls=":", label="mixllm unconstrained")
    axes[0, 0].set(xlabel="arrival rate (queries/s)", ylabel="quality % of reference (30 s deadline)",
                   title="quality under the deadline vs load")
    axes[0, 1].axhline(r["config"]["tolerance_s"], color="red", ls=":", label="tolerance")
    axes[0, 1].set(xlabel="arrival rate (queries/s)", ylabel="p95 wait (s)", title="p95 wait vs load")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    top = results_by_rate[max(results_by_rate)]
    _share_plot(axes[1, 0], top["mixllm"], n_windows, f"mixllm traffic share over time at {max(rates):g} q/s")
    _line_plot(axes[1, 1], {k: top[k] for k in keys if k != "random"}, "mean_wait_s", n_windows,
               "mean wait (s)", f"mean wait over time at {max(rates):g} q/s")
    fig.suptitle("Latency-aware routing (latency profiles are ASSUMPTIONS, see the report)", fontsize=10)
    fig.tight_layout()
    return fig


def simulate_main(*, out_dir: str | Path = "runs/simulate", rate: float = 10.0, arrival: str = "uniform",
                  batch_s: float = 1.0, refresh_s: float | None = 10.0, tolerance_s: float = 30.0,
                  cost_weight: float | None = None, budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA,
                  tau: float = STREAM_TAU, alpha: float = STREAM_ALPHA, repeat: int = 1, seed: int = 0,
                  router_path: str | Path | None = None, quick: bool = False, progress: bool = True) -> dict:
    """`mixllm-jax simulate`: one stream at one load; writes simulate.json / .md / .png in out_dir.

    Trains a router on the RouterBench train split (or restores `router_path`, a checkpoint, and
    embeds with its encoder), streams the test split (shuffled, `repeat` times) at `rate` queries/s
    (`arrival` "uniform" or "poisson"; routing windows of `batch_s` s; load snapshot refreshed every
    `refresh_s` s, None/0 = continuously; quality 0 past `tolerance_s`), and reports the router with
    the latency penalty (beta, tau) and without it, the cascades, random and every single LLM.
    cost_weight None: calibrated on the train split to `budget_pct`% of GPT-4's cost.
    Returns the report dict (report["paths"] lists the files written).
    """
    config = sim.StreamConfig(rate=rate, arrival=arrival, batch_s=batch_s, refresh_s=refresh_s,
                              tolerance_s=tolerance_s, seed=seed)
    if router_path is not None:
        from mixllm_jax import checkpoint

        router = checkpoint.restore_router(router_path)[0]
        d = load_data(quick, features="onehot" if router.encoder is None else "encoder",
                      max_length=router.max_length, progress=progress)
        if router.encoder is not None:
            d.e_train = train.embed(router.encoder, d.train, router.max_length, router.truncation_side, progress=progress)
            d.e_test = train.embed(router.encoder, d.test, router.max_length, router.truncation_side, progress=progress)
    else:
        router, d = None, load_data(quick, progress=progress)
    return run_latency(d, out_dir, name="simulate", rates=(rate,), repeat=repeat, config=config,
                       cost_weight=cost_weight, budget_pct=budget_pct, beta=beta, tau=tau, alpha=alpha,
                       router=router, progress=progress)


# ----------------------------------------------------------------------------------------------
# Continual learning: offline:online splits, no / refined / binary feedback (the paper's Table 1)
# ----------------------------------------------------------------------------------------------


def hull_at(pts: list[dict], cap: float) -> float:
    """Quality on the non-decreasing convex hull of a sweep's points at cost `cap` (the best quality
    reachable at cost <= cap, mixing two cost weights where needed; RouterBench's definition)."""
    return metrics.hull_quality_at_cost([p["cost_pct"] for p in pts], [p["quality_pct"] for p in pts], cap)


def band_quality(pts: list[dict], band: tuple[float, float] = (5.0, 30.0)) -> float:
    """Mean hull quality over a band of cost % (an AIQ restricted to the budgets that matter)."""
    cs = np.linspace(band[0], band[1], 26)
    return float(np.mean([hull_at(pts, c) for c in cs]))


def run_continual(d: ExperimentData, out_dir, *, splits: Sequence[float] = (0.8, 0.5, 0.3),
                  extra_splits: Sequence[float] = (0.1, 0.05), modes: Sequence[str] = sim.LEARNING_MODES,
                  seeds: Sequence[int] = (0, 1, 2), config: sim.StreamConfig = sim.StreamConfig(),
                  budget_pct: float = BUDGET_PCT, band: tuple[float, float] = (5.0, 30.0),
                  beta: float = STREAM_BETA, tau: float = STREAM_TAU, alpha: float = STREAM_ALPHA,
                  n_windows: int = 20, progress: bool = True) -> dict:
    """For each offline fraction (splits, then the supplementary extra_splits) and seed: train
    offline (full information) on that part of d.train, stream the rest (10 q/s, with load) learning
    as each mode says, then evaluate every final state on d.test (no load). Also a full-information
    upper reference (every LLM's outcome of the online part added to the arms).

    Quality at equal or lower cost: the hull quality of each state's lambda sweep at the no-online
    router's test cost at its calibrated lambda (`hull_at`); `band_quality` averages the hull over
    `band` cost %. Gains are relative to no online learning, averaged over seeds."""
    if "none" not in modes:
        raise ValueError("modes must include 'none' (the baseline of the gains)")
    t_start = time.time()
    world = sim.World.from_specs(d.train.specs)
    rows, last_runs = [], {}
    all_splits = list(splits) + [f for f in extra_splits if f not in splits]
    for frac in all_splits:
        for seed in seeds:
            off_i, on_i = _split_idx(len(d.train), frac, seed)
            off, on = d.train.select(off_i), d.train.select(on_i)
            router = _train(off, d.e_train[off_i], d, progress=progress)
            x_off, x_on, x_te = (_x(router, e) for e in (d.e_train[off_i], d.e_train[on_i], d.e_test))
            lam = _calibrate(router, x_off, off, budget_pct, alpha)
            cfg = dataclasses.replace(config, seed=seed)
            stream = sim.make_stream(on, x_on, cfg)
            entry = {"offline_frac": frac, "seed": seed, "n_offline": len(off), "n_online": len(on),
                     "cost_weight": lam, "modes": {}}
            runs = {}
            for mode in modes:
                res = sim.run_router(stream, world, router.state, router.registry, _policy(lam, beta, tau, alpha), cfg,
                                     learning=mode, name=f"{mode} {round(frac * 100)}:{round((1 - frac) * 100)}",
                                     progress=progress)
                bonus = None
                if mode == "binary":
                    bonus = np.asarray(feedback.bonus(res.feedback_state, x_te))
                cws, pts = _sweep(res.state, res.registry, x_te, d.test, alpha, [lam], bonus)
                entry["modes"][mode] = {"test_at_cost_weight": _at(cws, pts, lam), "test_points": pts,
                                        "stream": res.summary()}
                if bonus is not None:
                    entry["modes"][mode]["feedback_bonus_mean_abs"] = float(
                        np.abs(bonus[:, np.asarray(res.state.active)]).mean())
                runs[mode] = res
            full_state = train.fill_arms(router.state, router.registry, x_on, on)
            cws, pts = _sweep(full_state, router.registry, x_te, d.test, alpha, [lam])
            entry["full_information"] = {"test_at_cost_weight": _at(cws, pts, lam), "test_points": pts}
            cap = entry["modes"]["none"]["test_at_cost_weight"]["cost_pct"]
            entry["cost_cap_pct"] = cap
            base = hull_at(entry["modes"]["none"]["test_points"], cap)
            base_band = band_quality(entry["modes"]["none"]["test_points"], band)
            base_best = _best_under(entry["modes"]["none"]["test_points"], cap)
            for key, m in [*entry["modes"].items(), ("full_information", entry["full_information"])]:
                m["quality_at_cap"] = hull_at(m["test_points"], cap)
                m["gain_rel_pct"] = _rel(m["quality_at_cap"], base)
                m["band_quality"] = band_quality(m["test_points"], band)
                m["band_gain_rel_pct"] = _rel(m["band_quality"], base_band)
                m["best_point_at_cap"] = _best_under(m["test_points"], cap)
                m["best_point_gain_rel_pct"] = _rel(m["best_point_at_cap"], base_best)
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
            mean = lambda k: float(np.mean([get(e)[k] for e in es]))  # noqa: E731
            row[key] = {"quality_at_cap": mean("quality_at_cap"), "gain_rel_pct": mean("gain_rel_pct"),
                        "gain_rel_pct_per_seed": [get(e)["gain_rel_pct"] for e in es],
                        "band_quality": mean("band_quality"), "band_gain_rel_pct": mean("band_gain_rel_pct"),
                        "best_point_gain_rel_pct": mean("best_point_gain_rel_pct"),
                        "quality_at_cost_weight": float(np.mean([get(e)["test_at_cost_weight"]["quality_pct"] for e in es])),
                        "cost_at_cost_weight": float(np.mean([get(e)["test_at_cost_weight"]["cost_pct"] for e in es]))}
        row["cost_cap_pct"] = float(np.mean([e["cost_cap_pct"] for e in es]))
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
    report = {"experiment": "continual", "latency_note": sim.LATENCY_NOTE, "reference": REFERENCE,
              "features": d.features, "config": _config_dict(config), "splits": list(splits),
              "extra_splits": [f for f in extra_splits if f not in splits], "seeds": list(seeds), "band_pct": list(band),
              "modes": list(modes), "policy": {"beta": beta, "tau": tau, "alpha": alpha,
                                               "cost_weight_from": f"calibrated on the offline part to {budget_pct}% cost"},
              "table": table, "runs": rows, "acceptance": acc, "paper_table1": {k: {str(f): v for f, v in m.items()}
                                                                                  for k, m in PAPER_TABLE1.items()},
              "seconds": time.time() - t_start}
    md = _continual_md(report)
    fig = _continual_fig(report, last_runs, n_windows)
    report["paths"] = {k: str(v) for k, v in _write(out_dir, "continual", report, md, fig).items()}
    return report


def _continual_md(r: dict) -> str:
    modes = r["modes"]
    lo, hi = r["band_pct"]
    lines = ["# continual: online learning from feedback (the paper's Table 1 setup)", "", f"> {r['latency_note']}", "",
             "Per split of the RouterBench train split (offline:online, random, seeds " + ", ".join(map(str, r["seeds"])) +
             "): train offline with full information on the offline part; stream the online part at "
             f"{r['config']['rate']:g} queries/s with load; `refined` updates the chosen LLM's arm with its observed "
             "quality and completion tokens (bandit feedback), `binary` trains the dynamic feedback network on "
             "satisfied / not; then evaluate on the test split with no load. `q%` is % of "
             f"{r['reference']}'s quality at equal or lower cost: the non-decreasing convex hull of the state's lambda "
             "sweep at the no-online router's test cost at its calibrated lambda (`cap`); gains are relative to no "
             f"online learning, mean over seeds. `band` gains compare the mean hull quality over {lo:g}-{hi:g}% cost. "
             "`full info` adds every LLM's outcome of every online query to the arms (an upper reference: what the "
             "arms could learn from the online part at best; not a deployable mode).",
             "", "| offline:online | cap % | none q% | " + " | ".join(f"{m} q% (gain) [paper]" for m in modes if m != "none")
             + " | full info q% (gain) | band gains: " + " / ".join([m for m in modes if m != "none"] + ["full"]) + " |",
             "| --- | --- | --- |" + " --- |" * (len(modes) - 1) + " --- | --- |"]
    for row in r["table"]:
        cells = [f"{_f(row[m]['quality_at_cap'])} ({_f(row[m]['gain_rel_pct'], 2, True)}%) "
                 f"[{_f(row.get(f'paper_{m}_gain_pct'), 2, True)}%]" for m in modes if m != "none"]
        fi = row["full_information"]
        bands = " / ".join(f"{_f(row[m]['band_gain_rel_pct'], 2, True)}%" for m in [*modes[1:], "full_information"] if m != "none")
        split = row["split"] + (" (suppl.)" if row["supplementary"] else "")
        lines.append(f"| {split} | {_f(row['cost_cap_pct'])} | {_f(row['none']['quality_at_cap'])} | " + " | ".join(cells)
                     + f" | {_f(fi['quality_at_cap'])} ({_f(fi['gain_rel_pct'], 2, True)}%) | {bands} |")
    if len(r["seeds"]) > 1:
        lines += ["", "Per-seed gains at the cap (% relative):", ""] + [
            f"- {row['split']}: " + "; ".join(f"{m} {[round(g, 2) for g in row[m]['gain_rel_pct_per_seed']]}"
                                              for m in [*modes, "full_information"] if m != "none") for row in r["table"]]
    lines += ["", "At the calibrated cost weight itself (quality% / cost%, mean over seeds):", "",
              "| offline:online | " + " | ".join(modes) + " | full info |", "| --- |" + " --- |" * (len(modes) + 1)]
    for row in r["table"]:
        lines.append(f"| {row['split']} | " + " | ".join(
            f"{_f(row[m]['quality_at_cost_weight'])} / {_f(row[m]['cost_at_cost_weight'])}"
            for m in [*modes, "full_information"]) + " |")
    a = r["acceptance"]
    if "refined_gain_30_70_pct" in a:
        lines += ["", f"Refined gain at 30:70: {_f(a['refined_gain_30_70_pct'], 2, True)}% vs the paper's "
                  f"+{a['paper_refined_gain_30_70_pct']}%: short by {_f(a['shortfall_vs_paper_pct_points'])} percentage "
                  f"points; the full-information reference gains {_f(a['full_information_gain_30_70_pct'], 2, True)}% there. "
                  f"Refined gain positive in every split: {a['refined_gain_every_split']}."]
    return "\n".join(lines)


def _continual_fig(r: dict, last_runs: dict, n_windows: int):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    frac = min(last_runs)
    runs = last_runs[frac]
    _line_plot(axes[0, 0], runs, "quality_pct", n_windows, "quality % (30 s deadline)",
               f"online stream ({round(frac * 100)}:{round((1 - frac) * 100)}): quality over time")
    _line_plot(axes[0, 1], runs, "cost_pct", n_windows, "cost %", "online stream: cost over time")
    key = "refined" if "refined" in runs else next(iter(runs))
    _share_plot(axes[1, 0], runs[key], n_windows, f"traffic share over time ({key} feedback)")
    ax = axes[1, 1]
    labels = [row["split"] for row in r["table"]]
    modes = [m for m in r["modes"] if m != "none"] + ["full_information"]
    w = 0.8 / (len(modes) + 1)
    for i, m in enumerate(modes):
        ax.bar(np.arange(len(labels)) + i * w, [row[m]["gain_rel_pct"] for row in r["table"]], w, label=f"{m} (ours)")
        if m in PAPER_TABLE1:
            ax.scatter(np.arange(len(labels)) + i * w, [PAPER_TABLE1[m].get(row["offline_frac"], np.nan) for row in r["table"]],
                       marker="x", color="black", zorder=3)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(np.arange(len(labels)) + w * (len(modes) - 1) / 2, labels)
    ax.set(xlabel="offline:online", ylabel="test quality gain at equal or lower cost (% rel.)",
           title="gain over no online learning (x: the paper's)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# A changing set of LLMs
# ----------------------------------------------------------------------------------------------

DEFAULT_ADDED = ("zero-one-ai/Yi-34B-Chat", "mistralai/mixtral-8x7b-chat", "claude-v2")
DEFAULT_REMOVED = "gpt-3.5-turbo-1106"


def run_llm_changes(d: ExperimentData, out_dir, *, added: Sequence[str] = DEFAULT_ADDED,
                    removed: str = DEFAULT_REMOVED, repriced: str | None = None, price_factor: float = 10.0,
                    at: tuple[float, float, float] = (0.2, 0.45, 0.7), frac_offline: float = 0.3,
                    prior: str | float = "mean", seed: int = 0, config: sim.StreamConfig = sim.StreamConfig(),
                    budget_pct: float = BUDGET_PCT, beta: float = STREAM_BETA, tau: float = STREAM_TAU,
                    alpha: float = STREAM_ALPHA, n_windows: int = 25, progress: bool = True) -> dict:
    """Train offline (frac_offline of d.train) on every LLM but `added`; stream the rest of d.train
    and d.test (shuffled) with refined feedback; at fractions `at` of the stream add `added` (cold
    start from `prior`), remove `removed`, and multiply `repriced`'s prices (default added[0]) by
    price_factor. Compared with the same router without online learning and with a router that had
    every LLM from the start (same removal and price change)."""
    t_start = time.time()
    repriced = repriced or added[0]
    models = list(d.train.models)
    initial = [m for m in models if m not in added]
    missing = [m for m in [*added, removed, repriced] if m not in models]
    if missing:
        raise ValueError(f"models {missing} are not in the data ({models})")
    if removed not in initial:
        raise ValueError(f"the removed LLM {removed!r} must be one of the initial LLMs")
    off_i, on_i = _split_idx(len(d.train), frac_offline, seed)
    off = d.train.select(off_i)
    rng = np.random.default_rng(seed + 1)
    stream_ds = _concat([d.train.select(on_i), d.test])
    e_stream = np.concatenate([d.e_train[on_i], d.e_test])
    perm = rng.permutation(len(stream_ds))
    stream_ds, e_stream = stream_ds.select(perm), e_stream[perm]
    capacity = 1 << max(1, (len(models) - 1).bit_length())
    router = _train(select_models(off, initial), d.e_train[off_i], d, capacity=capacity, progress=progress)
    router_all = _train(off, d.e_train[off_i], d, capacity=capacity, progress=progress)
    x_off = _x(router, d.e_train[off_i])
    lam = _calibrate(router, x_off, select_models(off, initial), budget_pct, alpha)
    world = sim.World.from_specs(d.train.specs)
    stream = sim.make_stream(stream_ds, _x(router, e_stream), config)
    stream_all = dataclasses.replace(stream, x=_x(router_all, e_stream))
    n = len(stream)
    t_add, t_rm, t_price = (int(round(f * n)) for f in at)
    r = world.index(repriced)
    price = sim.SetPrice(t_price, repriced, world.price_in[r] * 1e6 * price_factor, world.price_out[r] * 1e6 * price_factor)
    events = [*(sim.AddLLM(t_add, m, prior) for m in added), sim.RemoveLLM(t_rm, removed), price]
    pol = _policy(lam, beta, tau, alpha)
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
    phase_names = ["initial LLMs", f"after adding {len(added)}", f"after removing {_short(removed)}",
                   f"after {_short(repriced)} x{price_factor:g} price"]
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
    report = {"experiment": "llm-changes", "latency_note": sim.LATENCY_NOTE, "reference": REFERENCE,
              "features": d.features, "config": _config_dict(config), "n_offline": len(off), "n_stream": n,
              "initial": initial, "added": list(added), "removed": removed, "repriced": repriced,
              "price_factor": price_factor, "prior": prior, "cost_weight": lam,
              "events": ad.info["events"], "event_rows": {"add": t_add, "remove": t_rm, "price": t_price},
              "phases": phases, "checks": checks, "compiles": {k: v.info["compiles"] for k, v in runs.items()},
              "timeline": {k: v.timeline(n_windows) for k, v in runs.items()}, "seconds": time.time() - t_start}
    md = _changes_md(report)
    ev_t = [(stream.arrival[t_add], f"+{len(added)} LLMs"), (stream.arrival[t_rm], f"-{_short(removed)}"),
            (stream.arrival[min(t_price, n - 1)], f"{_short(repriced)} x{price_factor:g}")]
    fig = _changes_fig(report, runs, n_windows, ev_t, gi)
    report["paths"] = {k: str(v) for k, v in _write(out_dir, "llm-changes", report, md, fig).items()}
    return report


def _concat(parts: Sequence[Dataset]) -> Dataset:
    f = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    lst = lambda name: [v for p in parts for v in getattr(p, name)]  # noqa: E731
    return Dataset(query_ids=lst("query_ids"), prompts=lst("prompts"), tags=lst("tags"), models=list(parts[0].models),
                   quality=f("quality"), cost=f("cost"), prompt_tokens=f("prompt_tokens"),
                   completion_tokens=f("completion_tokens"), split=lst("split"), latency_s=None,
                   specs=parts[0].specs, report={})


def _changes_md(r: dict) -> str:
    c = r["checks"]
    lines = ["# llm-changes: LLMs added, removed and repriced mid-stream", "", f"> {r['latency_note']}", "",
             f"Offline: {r['n_offline']} train queries with the {len(r['initial'])} initial LLMs (full information). "
             f"Stream: {r['n_stream']} queries (rest of train + test, shuffled) at {r['config']['rate']:g} q/s with "
             f"refined feedback. At query {r['event_rows']['add']} add " + ", ".join(_short(m) for m in r["added"]) +
             f" (cold start, prior `{r['prior']}`); at {r['event_rows']['remove']} remove {_short(r['removed'])}; at "
             f"{r['event_rows']['price']} multiply {_short(r['repriced'])}'s prices by {r['price_factor']:g} (router told; "
             "no retraining). `adaptive_no_learning`: same events, no online learning; `all_llms_from_start`: trained "
             "offline with every LLM, same removal and price change.", "",
             "## Checks", "",
             f"- recompilations after the first event (compile counters): {c['recompiles_after_first_event']} -> "
             f"no recompilation: **{c['no_recompilation']}**",
             f"- share of {_short(r['removed'])} before removal {c['removed_share_before_removal']:.3f}, after: "
             + ", ".join(f"{k} {v:.3f}" for k, v in c["removed_share_after_removal"].items())
             + f" -> nothing routed to it: **{c['nothing_routed_to_removed']}**",
             f"- share of the new {_short(c['new_llm'])} by quarter after its addition: "
             + ", ".join(f"{v:.3f}" for v in c["new_llm_share_by_quarter_after_add"])
             + f" (no learning: " + ", ".join(f"{v:.3f}" for v in c["new_llm_share_by_quarter_after_add_no_learning"])
             + f") -> grows: **{c['new_llm_share_grows']}**; after the removal of {_short(r['removed'])}: "
             + ", ".join(f"{k} {v:.3f}" for k, v in c["new_llm_share_after_removal"].items()),
             f"- share of {_short(c['repriced'])}: {c['repriced_share_before_price_change']:.3f} before the price change, "
             f"{c['repriced_share_after_price_change']:.3f} after -> traffic moves: **{c['price_change_moves_traffic']}**",
             "", "## Quality and cost by phase (% of the reference's logged totals; second half of each phase in brackets)", "",
             "| phase | " + " | ".join(f"{k} q% (2nd half)" for k in r["phases"]) + " | "
             + " | ".join(f"{k} cost% (2nd half)" for k in r["phases"]) + " |",
             "| --- |" + " --- |" * (2 * len(r["phases"]))]
    keys = list(r["phases"])
    for i, ph in enumerate(r["phases"][keys[0]]):
        qs = [f"{_f(r['phases'][k][i]['all']['quality_pct'])} ({_f(r['phases'][k][i]['second_half']['quality_pct'])})" for k in keys]
        cs = [f"{_f(r['phases'][k][i]['all']['cost_pct'])} ({_f(r['phases'][k][i]['second_half']['cost_pct'])})" for k in keys]
        lines.append(f"| {ph['phase']} | " + " | ".join(qs) + " | " + " | ".join(cs) + " |")
    lines += ["", "## Traffic share of the adaptive router by phase", "",
              "| phase | " + " | ".join(_short(m) for m in r["initial"] + r["added"]) + " |",
              "| --- |" + " --- |" * (len(r["initial"]) + len(r["added"]))]
    for ph in r["phases"]["adaptive"]:
        lines.append(f"| {ph['phase']} | " + " | ".join(f"{ph['all']['share'].get(m, 0.0):.3f}"
                                                        for m in r["initial"] + r["added"]) + " |")
    return "\n".join(lines)


def _changes_fig(r: dict, runs: dict, n_windows: int, ev_t, gi: int):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _share_plot(axes[0, 0], runs["adaptive"], n_windows, "adaptive router: traffic share over time", ev_t)
    ax = axes[0, 1]
    for k, res in runs.items():
        tl = res.timeline(n_windows)
        ax.plot(_mid(tl), [w["share"].get(r["checks"]["new_llm"], 0.0) for w in tl], marker=".", label=k)
    for t, _ in ev_t:
        ax.axvline(t, color="black", ls=":", lw=1)
    ax.set(xlabel="stream time (s)", ylabel="traffic share", title=f"share of the new {_short(r['checks']['new_llm'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _line_plot(axes[1, 0], runs, "quality_pct", n_windows, "quality % (30 s deadline)", "quality over time", ev_t)
    _line_plot(axes[1, 1], runs, "cost_pct", n_windows, "cost %", "cost over time", ev_t)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Out-of-domain: train on two tasks, stream the third
# ----------------------------------------------------------------------------------------------


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
    ind = _train(d.train, d.e_train, d, progress=progress)
    lam_in = _calibrate(ind, _x(ind, d.e_train), d.train, budget_pct, alpha)
    x_te_in = _x(ind, d.e_test)
    per_task, last = [], {}
    for task in tasks:
        te_rows = np.flatnonzero(keys_te == task)
        tr_rows = np.flatnonzero(keys_tr != task)
        on_rows = np.flatnonzero(keys_tr == task)
        on_rows = on_rows[np.random.default_rng(seed).permutation(len(on_rows))]
        if not (len(te_rows) and len(tr_rows) and len(on_rows)):
            raise ValueError(f"task {task!r}: needs train queries of other tasks and train + test queries of its own")
        test_t = d.test.select(te_rows)
        cws, pts_in = _sweep(ind.state, ind.registry, x_te_in[te_rows], test_t, alpha, [lam_in])
        cap = _at(cws, pts_in, lam_in)["cost_pct"]
        q_in = hull_at(pts_in, cap)
        ood = _train(d.train.select(tr_rows), d.e_train[tr_rows], d, progress=progress)
        lam = _calibrate(ood, _x(ood, d.e_train[tr_rows]), d.train.select(tr_rows), budget_pct, alpha)
        x_te = _x(ood, d.e_test[te_rows])
        stream = sim.make_stream(d.train.select(on_rows), _x(ood, d.e_train[on_rows]), config)
        entry = {"task": task, "n_train_other_tasks": len(tr_rows), "n_stream": len(on_rows), "n_test": len(te_rows),
                 "cost_cap_pct": cap, "in_domain": {"quality_at_cap": q_in, "at_cost_weight": _at(cws, pts_in, lam_in)},
                 "cost_weight": lam, "modes": {}}
        runs = {}
        for mode in modes:
            res = sim.run_router(stream, world, ood.state, ood.registry, _policy(lam, beta, tau, alpha), config,
                                 learning=mode, name=f"ood {task} {mode}", progress=progress)
            bonus = np.asarray(feedback.bonus(res.feedback_state, x_te)) if mode == "binary" else None
            cws_o, pts = _sweep(res.state, res.registry, x_te, test_t, alpha, [lam], bonus)
            q = hull_at(pts, cap)
            entry["modes"][mode] = {"quality_at_cap": q, "drop_rel_pct": _rel(q, q_in),
                                    "best_point_at_cap": _best_under(pts, cap),
                                    "at_cost_weight": _at(cws_o, pts, lam), "stream": res.summary()}
            if bonus is not None:
                entry["modes"][mode]["feedback_bonus_mean_abs"] = float(np.abs(bonus[:, np.asarray(res.state.active)]).mean())
            runs[mode] = res
        per_task.append(entry)
        last[task] = runs
    mean = {m: float(np.mean([e["modes"][m]["drop_rel_pct"] for e in per_task])) for m in modes}
    report = {"experiment": "out-of-domain", "latency_note": sim.LATENCY_NOTE, "reference": REFERENCE,
              "features": d.features, "config": _config_dict(config), "tasks": tasks, "in_domain_cost_weight": lam_in,
              "per_task": per_task, "mean_drop_rel_pct": mean, "paper": PAPER_OOD, "seconds": time.time() - t_start}
    md = _ood_md(report)
    fig = _ood_fig(report, last, n_windows)
    report["paths"] = {k: str(v) for k, v in _write(out_dir, "out-of-domain", report, md, fig).items()}
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
        lines.append(f"| {e['task']} | {e['n_stream']} / {e['n_test']} | {_f(e['cost_cap_pct'])} | {_f(e['in_domain']['quality_at_cap'])} | "
                     + " | ".join(f"{_f(e['modes'][m]['quality_at_cap'])} ({_f(e['modes'][m]['drop_rel_pct'], 2, True)}%)" for m in modes) + " |")
    lines.append("| mean | | | | " + " | ".join(f"({_f(r['mean_drop_rel_pct'][m], 2, True)}%)" for m in modes) + " |")
    lines += ["", f"The paper: {r['paper']['none']:+.2f}% without online learning, {r['paper']['online']:+.2f}% with it."]
    return "\n".join(lines)


def _ood_fig(r: dict, last: dict, n_windows: int):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0, 0]
    modes = list(r["mean_drop_rel_pct"])
    w = 0.8 / len(modes)
    tasks = [e["task"] for e in r["per_task"]]
    for i, m in enumerate(modes):
        ax.bar(np.arange(len(tasks)) + i * w, [e["modes"][m]["drop_rel_pct"] for e in r["per_task"]], w, label=m)
    ax.axhline(r["paper"]["none"], color="red", ls=":", label="paper, no online")
    ax.axhline(r["paper"]["online"], color="green", ls=":", label="paper, online")
    ax.set_xticks(np.arange(len(tasks)) + w * (len(modes) - 1) / 2, tasks)
    ax.set(ylabel="quality change vs in-domain (% rel.)", title="out-of-domain drop at equal or lower cost")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    task = r["per_task"][-1]["task"]
    runs = last[task]
    _line_plot(axes[0, 1], runs, "quality_pct", n_windows, "quality % (30 s deadline)", f"stream of {task}: quality over time")
    _line_plot(axes[1, 0], runs, "cost_pct", n_windows, "cost %", f"stream of {task}: cost over time")
    key = "refined" if "refined" in runs else next(iter(runs))
    _share_plot(axes[1, 1], runs[key], n_windows, f"stream of {task}: traffic share ({key})")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run_experiment(name: str, out_dir: str | Path = "runs/experiments", quick: bool = False,
                   data: ExperimentData | None = None, progress: bool = True, **kwargs) -> dict:
    """`mixllm-jax experiment NAME`: run one of EXPERIMENTS, writing NAME.json, NAME.md and NAME.png
    into out_dir. quick: a small random subset on one-hot task features (seconds). `data` overrides
    the data (see load_data); kwargs go to the experiment's function (run_latency, run_continual,
    run_llm_changes, run_ood). Returns the report dict (report["paths"] lists the files)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    d = data or load_data(quick, progress=progress)
    if quick:
        kwargs.setdefault("progress", False)
    else:
        kwargs.setdefault("progress", progress)
    fn = {"latency": run_latency, "continual": run_continual, "llm-changes": run_llm_changes,
          "out-of-domain": run_ood}[name]
    if quick and name == "latency":
        kwargs.setdefault("repeat", 2)
        kwargs.setdefault("rates", (10.0, 40.0))
    if quick and name == "continual":
        kwargs.setdefault("seeds", (0,))
        kwargs.setdefault("extra_splits", ())
    return fn(d, out_dir, **kwargs)

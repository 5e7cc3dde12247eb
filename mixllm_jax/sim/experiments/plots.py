"""The experiments' figures: traffic shares and per-window lines over stream time, one 2x2 figure per
experiment. Figures are built with matplotlib's object API (no pyplot, no global backend)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from mixllm_jax.sim import simulate as sim
from mixllm_jax.sim.experiments.common import PAPER_TABLE1, short


def window_mid(tl: list[dict]) -> np.ndarray:
    """The middle time of each window of a timeline."""
    return np.array([(w["t0"] + w["t1"]) / 2 for w in tl])


def share_plot(ax, res: sim.StreamResult, n_windows: int, title: str, events=()):
    """Stacked traffic share per LLM over stream time; events: [(time, label)] as dotted lines."""
    tl = res.timeline(n_windows)
    t = window_mid(tl)
    names = [m for m in res.stream.models if any(w["share"].get(m, 0) > 0 for w in tl)]
    ys = np.array([[w["share"].get(m, 0.0) for w in tl] for m in names])
    ax.stackplot(t, ys, labels=[short(m) for m in names], alpha=0.85)
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


def line_plot(ax, results: dict[str, sim.StreamResult], key: str, n_windows: int, ylabel: str, title: str, events=()):
    """One line per result: timeline[key] per window over stream time."""
    for label, res in results.items():
        tl = res.timeline(n_windows)
        ax.plot(window_mid(tl), [w[key] if w[key] is not None else np.nan for w in tl], marker=".", label=label)
    for ev_t, _ in events:
        ax.axvline(ev_t, color="black", ls=":", lw=1)
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def latency_fig(r: dict, results_by_rate: dict, n_windows: int):
    """Quality and p95 wait vs rate; traffic share and mean wait over time at the highest rate."""
    fig = Figure(figsize=(14, 9))
    axes = fig.subplots(2, 2)
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
    share_plot(axes[1, 0], top["mixllm"], n_windows, f"mixllm traffic share over time at {max(rates):g} q/s")
    line_plot(axes[1, 1], {k: top[k] for k in keys if k != "random"}, "mean_wait_s", n_windows,
               "mean wait (s)", f"mean wait over time at {max(rates):g} q/s")
    fig.suptitle("Latency-aware routing (latency profiles are ASSUMPTIONS, see the report)", fontsize=10)
    fig.tight_layout()
    return fig


def continual_fig(r: dict, last_runs: dict, n_windows: int):
    """The smallest split's stream (quality, cost, shares) and the gains per split vs the paper's."""
    fig = Figure(figsize=(14, 9))
    axes = fig.subplots(2, 2)
    frac = min(last_runs)
    runs = last_runs[frac]
    line_plot(axes[0, 0], runs, "quality_pct", n_windows, "quality % (30 s deadline)",
               f"online stream ({round(frac * 100)}:{round((1 - frac) * 100)}): quality over time")
    line_plot(axes[0, 1], runs, "cost_pct", n_windows, "cost %", "online stream: cost over time")
    key = "refined" if "refined" in runs else next(iter(runs))
    share_plot(axes[1, 0], runs[key], n_windows, f"traffic share over time ({key} feedback)")
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


def changes_fig(r: dict, runs: dict, n_windows: int, ev_t, gi: int):
    """Traffic shares, the new LLM's share, quality and cost over time, with the events marked."""
    fig = Figure(figsize=(14, 9))
    axes = fig.subplots(2, 2)
    share_plot(axes[0, 0], runs["adaptive"], n_windows, "adaptive router: traffic share over time", ev_t)
    ax = axes[0, 1]
    for k, res in runs.items():
        tl = res.timeline(n_windows)
        ax.plot(window_mid(tl), [w["share"].get(r["checks"]["new_llm"], 0.0) for w in tl], marker=".", label=k)
    for t, _ in ev_t:
        ax.axvline(t, color="black", ls=":", lw=1)
    ax.set(xlabel="stream time (s)", ylabel="traffic share", title=f"share of the new {short(r['checks']['new_llm'])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    line_plot(axes[1, 0], runs, "quality_pct", n_windows, "quality % (30 s deadline)", "quality over time", ev_t)
    line_plot(axes[1, 1], runs, "cost_pct", n_windows, "cost %", "cost over time", ev_t)
    fig.tight_layout()
    return fig


def ood_fig(r: dict, last: dict, n_windows: int):
    """Drops per held-out task (and the ood split) vs the paper's; one stream's quality, cost and shares
    (the ood split's when there is one, else the last held-out task's)."""
    fig = Figure(figsize=(14, 9))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    modes = list(r["modes"])
    w = 0.8 / len(modes)
    entries = [(e["task"], e["modes"]) for e in r["per_task"]]
    if r.get("ood_split") is not None:
        entries.append(("ood split", r["ood_split"]["modes"]))
    labels = [t for t, _ in entries]
    for i, m in enumerate(modes):
        ax.bar(np.arange(len(labels)) + i * w, [np.nan if em[m]["drop_rel_pct"] is None else em[m]["drop_rel_pct"]
                                                 for _, em in entries], w, label=m)
    ax.axhline(r["paper"]["none"], color="red", ls=":", label="paper, no online")
    ax.axhline(r["paper"]["online"], color="green", ls=":", label="paper, online")
    ax.set_xticks(np.arange(len(labels)) + w * (len(modes) - 1) / 2, labels)
    ax.set(ylabel="quality change vs in-domain (% rel.)", title="out-of-domain drop at equal or lower cost")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    task = "ood split" if r.get("ood_split") is not None else r["per_task"][-1]["task"]
    runs = last[task]
    line_plot(axes[0, 1], runs, "quality_pct", n_windows, "quality % (30 s deadline)", f"stream of {task}: quality over time")
    line_plot(axes[1, 0], runs, "cost_pct", n_windows, "cost %", f"stream of {task}: cost over time")
    key = "refined" if "refined" in runs else next(iter(runs))
    share_plot(axes[1, 1], runs[key], n_windows, f"stream of {task}: traffic share ({key})")
    fig.tight_layout()
    return fig


def regret_fig(r: dict):
    """Cumulative regret of each online mode against the best fixed policy in hindsight, one panel
    per offline:online split (mean over seeds)."""
    rows = [row for row in r["table"] if not row["supplementary"]] or r["table"]
    fig = Figure(figsize=(5 * len(rows), 4))
    axes = np.atleast_1d(fig.subplots(1, len(rows)))
    for ax, row in zip(axes, rows):
        _regret_panel(ax, [(m, row[m]["regret_curve"]["n"], row[m]["regret_curve"]["regret"], row[m]["regret_final"])
                           for m in r["modes"]], "online queries", row["split"])
    fig.tight_layout()
    return fig


def _regret_panel(ax, curves, xlabel: str, label: str) -> None:
    """One axes of cumulative regret curves: (mode, n, regret, final) each."""
    for m, n, regret, final in curves:
        ax.plot(n, regret, label=f"{m} ({final:.1f})")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel=xlabel, ylabel="cumulative regret (quality - lambda cost)",
           title=f"{label}: regret vs the best fixed policy in hindsight")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def ood_regret_fig(r: dict):
    """Cumulative regret of each online mode in every out-of-domain stream (held-out tasks, the ood
    split) against the best fixed policy in hindsight."""
    streams = [(e["task"], e["modes"]) for e in r["per_task"]]
    if r.get("ood_split") is not None:
        streams.append(("ood split", r["ood_split"]["modes"]))
    streams = [(label, ms) for label, ms in streams if any("regret" in v for v in ms.values())]
    fig = Figure(figsize=(5 * max(len(streams), 1), 4))
    axes = np.atleast_1d(fig.subplots(1, max(len(streams), 1)))
    for ax, (label, ms) in zip(axes, streams):
        _regret_panel(ax, [(m, v["regret"]["n"], v["regret"]["regret"], v["regret"]["final"])
                           for m, v in ms.items() if "regret" in v], "stream queries", label)
    fig.tight_layout()
    return fig

"""The report of an evaluation (``evaluate.evaluate``'s dict): its tables, plots and files.

``write_report`` writes ``report.json`` (``compact``: per-task points only with full=True),
``report.md`` (``format_table``, ``format_task_table``, and the bootstrap, budget and calibration
tables when present), ``curves.png`` (``plot_curves``) and ``reliability.png`` (``plot_reliability``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mixllm_jax.core import metrics
from mixllm_jax.offline.evaluate import PAPER_BUDGET_PCT, budget_key


def plot_reliability(cal: Mapping[str, Any], path: str | Path) -> Path:
    """Reliability diagram of `evaluate.calibration`: observed vs predicted quality per bin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    b = cal["bins"]
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.plot([x["predicted"] for x in b], [x["observed"] for x in b], "o-")
    for x in b:
        ax.annotate(str(x["n"]), (x["predicted"], x["observed"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    ax.set_xlabel("predicted quality (bin mean)")
    ax.set_ylabel("observed quality (bin mean)")
    ax.set_title(f"Calibration, ECE {cal['ece']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(x, nd=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _order(report) -> list[str]:
    """Sweeps by AIQ (best first), then one-point methods (single LLMs) by quality."""
    ms = report["methods"]
    return sorted(ms, key=lambda n: (ms[n]["kind"] == "single", -(ms[n]["points"][0]["quality_pct"]
                                     if ms[n]["kind"] == "single" or ms[n]["aiq"] is None else ms[n]["aiq"])))


NO_AIQ = "—"  # a one-point method (a single LLM) has no curve: its AIQ is not shown


def format_table(report: Mapping[str, Any]) -> str:
    """Markdown table, best AIQ first: AIQ, best quality % at each budget (with its cost %),
    the top-quality point and the cheapest point of each method."""
    budgets = report.get("budgets_pct", [PAPER_BUDGET_PCT])
    head = ["method", "AIQ"]
    for b in budgets:
        head.append(f"quality% @ cost<={b:g}% (cost%)")
    head += ["top quality% (cost%)", "cheapest cost% (quality%)", "task-mean quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for name in _order(report):
        m = report["methods"][name]
        row = [name + (" (ref)" if name == report["reference"] else ""),
               NO_AIQ if m["kind"] == "single" or m["aiq"] is None else _fmt(m["aiq"])]
        for b in budgets:
            p = m["best_point_at_cost_pct"].get(budget_key(b))
            row.append("-" if p is None else f"{p['quality_pct']:.2f} ({p['cost_pct']:.2f})")
        top = max(m["points"], key=lambda p: (p["quality_pct"], -p["cost_pct"]))
        low = min(m["points"], key=lambda p: (p["cost_pct"], -p["quality_pct"]))
        row.append(f"{top['quality_pct']:.2f} ({top['cost_pct']:.2f})")
        row.append(f"{low['cost_pct']:.2f} ({low['quality_pct']:.2f})")
        row.append(_fmt(m.get("task_mean_quality")))
        lines.append("| " + " | ".join(row) + " |")
    if report.get("flat_cost"):
        lines.append(f"\n{NO_AIQ}: every LLM costs the same on these queries, so no method has a cost-quality curve "
                     "and no AIQ: compare quality.")
    elif any(m["kind"] == "single" for m in report["methods"].values()):
        lines.append(f"\n{NO_AIQ}: one operating point (a single LLM) has no curve, so no AIQ; its quality "
                     "and cost are in the other columns.")
    return "\n".join(lines)


def format_task_table(report: Mapping[str, Any], methods_per_table: int = 6) -> str:
    """Markdown tables per task, one row per task (any number of tasks stays narrow), at most
    `methods_per_table` methods per table: each cell is the method's AIQ / best quality % at the
    first budget on that task's queries."""
    b = budget_key(report.get("budgets_pct", [PAPER_BUDGET_PCT])[0])
    names = _order(report)
    out = [f"Each cell: AIQ / best quality % at cost <= {b}% on the task's queries, % of the reference "
           f"on that task ({NO_AIQ}: a single LLM has no AIQ)."]
    for i in range(0, len(names), methods_per_table):
        chunk = names[i:i + methods_per_table]
        lines = ["| task (queries) | " + " | ".join(chunk) + " |", "|" + "|".join([" --- "] * (len(chunk) + 1)) + "|"]
        for t, info in report["tasks"].items():
            cells = []
            for name in chunk:
                m = report["methods"][name]
                pt = m["per_task"][t]
                aiq = NO_AIQ if m["kind"] == "single" or report.get("flat_cost") else _fmt(pt["aiq"])
                cells.append(f"{aiq} / {_fmt(pt['best_quality_at_cost_pct'].get(b))}")
            lines.append(f"| {t} ({info['n_queries']}) | " + " | ".join(cells) + " |")
        out += ["", "\n".join(lines)]
    return "\n".join(out)


def compact(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without its per-task operating points (per task: AIQ and best quality at each
    budget only): what ``report.json`` holds unless the full report is asked for."""
    out = dict(report)
    out["methods"] = {name: {**m, "per_task": {t: {"aiq": pt["aiq"],
                                                     "best_quality_at_cost_pct": pt["best_quality_at_cost_pct"]}
                                                 for t, pt in m["per_task"].items()}}
                      for name, m in report["methods"].items()}
    return out


def format_bootstrap_table(boot: Mapping[str, Any]) -> str:
    """Markdown: mixllm minus each method, with the 95% paired-bootstrap interval."""
    lines = ["| mixllm minus | AIQ diff [95% CI] | task-mean quality diff [95% CI] |", "| --- | --- | --- |"]
    for name, b in boot.items():
        cell = lambda k: NO_AIQ if b[k]["diff"] is None else \
            f"{b[k]['diff']:+.2f} [{b[k]['lo']:+.2f}, {b[k]['hi']:+.2f}]"  # noqa: E731
        lines.append(f"| {name} | {cell('aiq')} | {cell('task_mean_quality')} |")
    return "\n".join(lines)


def format_budget_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each budget's target, realised cost % and quality %, and its mixture."""
    lines = ["| budget (% of ref cost) | realised cost % | quality % | cost weights (share at the 2nd) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        mix = f"{r['cost_weight']:.4g}" + (f", {r['mix_cost_weight']:.4g} ({100 * r['mix']:.1f}%)" if r["mix"] else "")
        lines.append(f"| {r['budget_pct']:g} | {r['cost_pct']:.2f} | {r['quality_pct']:.2f} | {mix} |")
    return "\n".join(lines)


def plot_curves(report: Mapping[str, Any], path: str | Path) -> Path:
    """PNG of every method's cost% - quality% points and non-decreasing hull (log cost axis),
    single LLMs as labelled points, the reference at (100, 100), a line at each budget."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6.5))
    sweeps = [n for n in _order(report) if report["methods"][n]["kind"] == "sweep"]
    singles = [n for n in report["methods"] if report["methods"][n]["kind"] == "single"]
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", "-.", ":"]
    for i, name in enumerate(sweeps):
        m = report["methods"][name]
        c = np.array([p["cost_pct"] for p in m["points"]])
        q = np.array([p["quality_pct"] for p in m["points"]])
        hc, hq = metrics.non_decreasing_convex_hull(c, q)
        # the hull is piecewise linear in cost: sample it densely so it stays exact on a log axis
        xs = np.geomspace(hc[0], max(report["c_max_pct"], hc[0] * 1.0001), 400)
        color = cmap(i % 10)
        ax.plot(xs, np.interp(xs, hc, hq), styles[i % 4], color=color, lw=2.4 - 0.25 * (i % 4),
                label=name if m["aiq"] is None else f"{name} (AIQ {m['aiq']:.1f})")
        ax.scatter(c, q, s=10, color=color, alpha=0.6)
    for name in singles:
        p = report["methods"][name]["points"][0]
        is_ref = name == report["reference"]
        ax.scatter([p["cost_pct"]], [p["quality_pct"]], marker="*" if is_ref else "o",
                   s=120 if is_ref else 30, color="black" if is_ref else "gray", zorder=3)
        ax.annotate(name.split("/")[-1], (p["cost_pct"], p["quality_pct"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    for b in report.get("budgets_pct", []):
        ax.axvline(b, color="red", lw=1, ls=":")
        ax.text(b, ax.get_ylim()[0], f" {b:g}%", color="red", fontsize=8, va="bottom")
    ax.axhline(100.0, color="black", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"cost, % of {report['reference']} (log scale)")
    ax.set_ylabel(f"quality, % of {report['reference']}")
    ax.set_title(f"Quality vs cost on {report['n_queries']} test queries "
                 "(lines: non-decreasing convex hull)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="sweeps")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Mapping[str, Any], out_dir: str | Path, full: bool = False) -> dict[str, Path]:
    """Write ``report.json`` (:func:`compact` unless `full`: then every per-task point too),
    ``report.md`` (main and per-task tables) and ``curves.png``.

    Returns: ``{"json": path, "md": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "curves.png"}
    paths["json"].write_text(json.dumps(report if full else compact(report), indent=1, allow_nan=False) + "\n")
    md = [f"# Routing report: {report['n_queries']} queries, reference {report['reference']}", "",
          f"Quality and cost are % of {report['reference']}'s totals on the same queries. AIQ: "
          f"mean of the non-decreasing convex hull over cost 0..{report['c_max_pct']:.2f}% "
          "(the largest cost of any point, shared by all methods; RouterBench's definition). "
          "`quality% @ cost<=B%`: the best point actually run within the budget.", "",
          format_table(report), "", "task-mean quality: mean over tasks of each task's mean quality "
          "(x 100) at a method's first point (cost weight 0 for a router).", ""]
    if "policy" in report:
        p = report["policy"]
        md += [f"Saved operating point (`mixllm@budget`): budget {p['budget']}, cost weight "
               f"{p['cost_weight']:.4g}, {100 * p['mix']:.1f}% of queries at {p['mix_cost_weight']:.4g}.", ""]
    if report.get("bootstrap"):
        md += ["## Paired bootstrap (1,000 resamples of the test queries)", "",
               format_bootstrap_table(report["bootstrap"]), ""]
    if "budgets" in report:
        md += ["## Budgets met on the held-out curve", "", format_budget_table(report["budgets"]), ""]
    if "calibration" in report:
        paths["reliability"] = plot_reliability(report["calibration"], out / "reliability.png")
        md += [f"Calibration of predicted quality: ECE {report['calibration']['ece']:.4f} "
               "![reliability](reliability.png)", ""]
    md += ["## Per task", "", format_task_table(report), "", "![curves](curves.png)", ""]
    paths["md"].write_text("\n".join(md))
    plot_curves(report, paths["png"])
    return paths

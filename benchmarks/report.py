"""results.json, results.md (markdown tables) and PNG plots of one run of the throughput suite."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _rate(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _x(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}x" if v >= 100 else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _s(v) -> str:
    if v is None:
        return "same shapes as the row above: compiled once"
    return f"{v:.2f}" if v >= 0.01 else f"{v * 1e3:.2f} ms"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def targets_table(results: dict) -> str:
    rows = []
    for t in results["targets"]:
        unit = t.get("unit", "x")
        plain = not unit.startswith(("x", "of peak"))  # req/s, ms: the figure with its unit
        if t["measured"] is None:
            measured = f"not measured: {t['why']}"
        elif unit.startswith("of peak"):
            measured = f"{_pct(t['measured'])} of peak"
        elif plain:
            measured = f"{_rate(t['measured'])}{unit}"
        else:
            measured = f"{_x(t['measured'])}{unit[1:]}"
        cmp = "<=" if t.get("at_most") else ">="
        if unit.startswith("of peak"):
            goal = f">= {_pct(t['goal'])}"
        else:
            goal = f"{cmp} {t['goal']:g}{unit if plain else 'x'}"
        rows.append([t["target"], goal, measured, t["status"].upper() if t["status"] != "not measured"
                     else t["status"], t["where"] or "-"])
    return _table(["target", "goal", "measured in this run", "status", "where"], rows)


def _route_rows(rows):
    out = []
    for r in rows:
        out.append([str(r["B"]), str(r["K"]), str(r["d"]), _rate(r["jax_decisions_per_s"]),
                    f"{r['jax_gflops']:.1f}", _pct(r.get("peak_fraction_in_turns")), _pct(r["peak_fraction"]),
                    _rate(r.get("numpy_decisions_per_s")), _x(r.get("speedup_vs_numpy")),
                    _rate(r.get("mabwiser_decisions_per_s")), _x(r.get("speedup_vs_mabwiser")),
                    _pct(r.get("agree_numpy"))])
    return out


ROUTE_HEADER = ["B", "K", "d", "route_batch decisions/s", "GFLOP/s", "of matmul in turns", "of best matmul",
                "numpy /s", "vs numpy",
                "MABWiser predict /s", "vs MABWiser", "same arms as numpy"]


def markdown(results: dict) -> str:
    K0, d0, B0 = results["suite"]["center"]
    peak = results["matmul"]
    pol = results["route_policy"]
    lines = ["# mixllm-jax throughput", ""]
    lines.append(f"- device: **{results['device']}** (host {results['cpu']}, {results['cpu_count']} cores), "
                 f"jax {results['jax_version']}, Python {results['python']}")
    lines.append(f"- command: `{results['command'].strip()}`; wall {results['wall_s']:.0f} s; load average "
                 f"(1, 5, 15 min) at start {results['load_average_start']}, at end {results['load_average_end']}")
    if results.get("numpy_blas"):
        lines.append(f"- numpy BLAS: {'; '.join(results['numpy_blas'])}")
    if results.get("env"):
        lines.append(f"- environment: {', '.join(f'{k}={v}' for k, v in results['env'].items())}")
    for name, p in results["peers"].items():
        lines.append(f"- peer {name}: " + (p["version"] if p["version"] else f"skipped ({p['skipped']})"))
    lines.append(f"- matmul peak: **{peak['peak_gflops']:.1f} GFLOP/s** {peak['dtype']}, precision "
                 f"{peak['precision']}, n x n jnp matmuls measured {peak['measured']} ("
                 + ", ".join(f"n={n}: {g:.1f}" for n, g in peak["gflops_by_size"].items()) + ")")
    lines.append("- times: each figure is the best of several samples (block_until_ready()), the engine and "
                 "its peers sampled in turns so that other jobs' load falls on all alike; compilation excluded "
                 "and listed apart. Ratios = engine rate / peer rate, measured in this run.")
    lines += ["", "## Targets", "", targets_table(results), ""]

    route = [r for r in results["route"] if not r["in_batch_load"]]
    s = results["suite"]
    lines += ["## route_batch", "",
              f"Policy cost_weight={pol['cost_weight']:g}, alpha={pol['alpha']:g}, beta={pol['beta']:g}, "
              "in_batch_load off (the scoring numpy and MABWiser also do; MABWiser scores quality + "
              "alpha * width only, float64). GFLOP/s counts 2·B·K·d·(d+3) + 4·K·d². \"of matmul in turns\": "
              f"against an n={peak.get('side_size', '?')} matmul sampled in turns with the configuration (the "
              "peak this machine gave at that time); \"of best matmul\": against the run's best matmul.", ""]
    for title, key, vals, fixed in (("by B", "B", s["route_B"], dict(K=K0, d=d0)),
                                    ("by K", "K", s["route_K"], dict(d=d0, B=B0)),
                                    ("by d", "d", s["route_d"], dict(K=K0, B=B0))):
        rows = sorted([r for r in route if r[key] in vals and all(r[k] == v for k, v in fixed.items())],
                      key=lambda r: r[key])
        lines += [f"### {title} ({', '.join(f'{k}={v}' for k, v in fixed.items())})", "",
                  _table(ROUTE_HEADER, _route_rows(rows)), ""]
    ibl = [r for r in results["route"] if r["in_batch_load"]]
    center = next((r for r in route if (r["K"], r["d"], r["B"]) == (K0, d0, B0)), None)
    if ibl:
        r = ibl[0]
        extra = ""
        if center and "mabwiser_decisions_per_s" in center:
            extra = f" ({_x(r['jax_decisions_per_s'] / center['mabwiser_decisions_per_s'])} MABWiser predict)"
        lines += [f"With in_batch_load on (each query sees the load booked by those before it, a scan over B): "
                  f"K={r['K']} d={r['d']} B={r['B']}: {_rate(r['jax_decisions_per_s'])} decisions/s{extra}.", ""]
    if center and "mabwiser_f32_decisions_per_s" in center:
        lines += [f"MABWiser predict fed float32 contexts (as embeddings come; MABWiser casts them against its "
                  f"float64 matrices) at K={K0} d={d0} B={B0}: {_rate(center['mabwiser_f32_decisions_per_s'])} "
                  f"decisions/s, route_batch {_x(center['speedup_vs_mabwiser_f32'])} that. The table feeds it "
                  "float64 (its best case).", ""]
    if center and "agree_mabwiser" in center:
        lines += [f"Same work check: route_batch with cost_weight=0, beta=0 picks the same arm as MABWiser's "
                  f"LinUCB on {_pct(center['agree_mabwiser'])} of the {B0} queries (K={K0}, d={d0}).", ""]

    lines += ["## update_batch", "",
              f"K={K0}, d={d0}. numpy: Sherman-Morrison one observation at a time (float32); MABWiser: "
              "partial_fit one observation at a time (it re-inverts A, float64).", "",
              _table(["B", "arms", "update_batch updates/s", "numpy /s", "vs numpy", "MABWiser partial_fit /s",
                      "vs MABWiser"],
                     [[str(r["B"]), "one hot arm" if r["hot_arm"] else "spread", _rate(r["jax_updates_per_s"]),
                       _rate(r["numpy_updates_per_s"]), _x(r["speedup_vs_numpy"]),
                       _rate(r.get("mabwiser_updates_per_s")), _x(r.get("speedup_vs_mabwiser"))]
                      for r in results["update"]]), ""]

    lines += ["## Text to decision", ""]
    if results.get("text"):
        ts0 = results["text_setup"]
        lines += ["Transformer path: achieved GFLOP/s of Encoder.embed (MiniLM-L6 FLOPs: the six matmuls per "
                  "token and layer plus attention) and its fraction of the run's float32 matmul peak "
                  f"({peak['peak_gflops']:.1f} GFLOP/s).", "",
                  _table(["max_length", "encode texts/s", "GFLOP/s", "of matmul peak"],
                         [[str(r["max_length"]), _rate(r["encode_texts_per_s"]), _rate(r.get("encode_gflops")),
                           _pct(r.get("encode_peak_fraction"))] for r in results["text"]]), ""]
        if any("static_texts_per_s" in r for r in results["text"]):
            lines += [f"Static tier: {ts0.get('static_name')} ({ts0.get('static_dims')} dims), a Router (no head) "
                      "trained on the same queries; the same texts and policy.", "",
                      _table(["max_length", "static Router.decide texts/s", "static encode texts/s",
                              "vs MiniLM Router", "vs ST + MABWiser", "same decision as MiniLM", "compile s"],
                             [[str(r["max_length"]), _rate(r.get("static_texts_per_s")),
                               _rate(r.get("static_encode_texts_per_s")), _x(r.get("static_vs_jax")),
                               _x(r.get("static_speedup_vs_peer")), _pct(r.get("static_agree_jax")),
                               _s(r.get("static_compile_s"))] for r in results["text"]]), ""]
        ts = results["text_setup"]
        lines += [f"Router: {ts['encoder_name']} + LinUCB (no head) over {ts['n_llms']} LLMs, trained on "
                  f"{ts['n_train']} RouterBench queries; policy = pure LinUCB (cost_weight=0, beta=0) as "
                  "MABWiser's. Batches of the longest RouterBench prompts, each truncated to max_length "
                  "(right side, as sentence-transformers); times include tokenization. Peer: "
                  "sentence-transformers encode on torch CPU, then MABWiser predict.", "",
                  _table(["max_length", "texts", "tokens/text", "Router.decide texts/s", "encode alone texts/s",
                          "ST + MABWiser texts/s", "vs ST + MABWiser", "ST encode texts/s", "encode vs ST",
                          "same decision"],
                         [[str(r["max_length"]), str(r["texts"]), f"{r['tokens_per_text']:.0f}",
                           _rate(r["jax_texts_per_s"]), _rate(r["encode_texts_per_s"]),
                           _rate(r.get("peer_texts_per_s")), _x(r.get("speedup_vs_peer")),
                           _rate(r.get("st_encode_texts_per_s")), _x(r.get("encode_vs_st")),
                           _pct(r.get("agree_peer"))] for r in results["text"]]), ""]
    else:
        lines += [f"Skipped: {results.get('text_skipped')}.", ""]

    h = results.get("http_static")
    if h:
        lines += ["## HTTP: /v1/route on the static tier", ""]
        if "skipped" in h:
            lines += [f"Skipped: {h['skipped']}.", ""]
        else:
            lines += [f"`{h['command']}`: {h['router']}, server --max-batch {h['max_batch']}; the server, the stub "
                      "backend and the load generator share this machine's cores (loopback).", "",
                      _table(["concurrency", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch"],
                             [[str(r["concurrency"]), str(r["ok"]), _rate(r["rps"]), str(r["p50_ms"]), str(r["p95_ms"]),
                               str(r["p99_ms"]), "-" if r.get("mean_batch") is None else f"{r['mean_batch']:.1f}"]
                              for r in h["route"]]), ""]

    comp = []
    for r in results["route"]:
        comp.append(["route_batch" + (" (in_batch_load)" if r["in_batch_load"] else ""),
                     f"K={r['K']} d={r['d']} B={r['B']}", _s(r["compile_s"]), _s(r["jax_s"])])
    for r in results["update"]:
        comp.append(["update_batch", f"K={r['K']} d={r['d']} B={r['B']} {'hot' if r['hot_arm'] else 'spread'}",
                     _s(r["compile_s"]), _s(r["jax_s"])])
    for r in results.get("text", []):
        comp.append(["Router.decide (route_text_batch)", f"{r['texts']} texts, max_length {r['max_length']}",
                     _s(r["compile_s"]), _s(r["jax_s"])])
        comp.append(["Encoder.embed", f"{r['texts']} texts, max_length {r['max_length']}",
                     _s(r["encode_compile_s"]), _s(r["texts"] / r["encode_texts_per_s"])])
    lines += ["## Compile time, apart from run time", "",
              "Seconds of tracing + XLA compilation, beside one steady call: route_batch and update_batch "
              "timed as jit(...).lower(...).compile(); Router.decide and Encoder.embed as their first call "
              "minus a steady call (it includes tokenizer set-up).", "",
              _table(["entry point", "configuration", "compile s", "steady call s"], comp), ""]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    K0, d0, B0 = results["suite"]["center"]
    s = results["suite"]
    route = [r for r in results["route"] if not r["in_batch_load"]]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for j, (key, vals, fixed) in enumerate((("B", s["route_B"], dict(K=K0, d=d0)),
                                            ("K", s["route_K"], dict(d=d0, B=B0)),
                                            ("d", s["route_d"], dict(K=K0, B=B0)))):
        rows = sorted([r for r in route if r[key] in vals and all(r[k] == v for k, v in fixed.items())],
                      key=lambda r: r[key])
        if not rows:
            continue
        xs = [r[key] for r in rows]
        ax = axes[0, j]
        ax.plot(xs, [r["jax_decisions_per_s"] for r in rows], "o-", label="route_batch")
        for k, lab in (("numpy_decisions_per_s", "numpy LinUCB"), ("mabwiser_decisions_per_s", "MABWiser predict")):
            if all(k in r for r in rows):
                ax.plot(xs, [r[k] for r in rows], "s--", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("decisions / s")
        ax.set_title(f"route_batch by {key} ({', '.join(f'{k}={v}' for k, v in fixed.items())})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax = axes[1, j]
        if all("peak_fraction_in_turns" in r for r in rows):
            ax.plot(xs, [100 * r["peak_fraction_in_turns"] for r in rows], "o-", color="C3",
                    label="of the matmul sampled in turns")
        ax.plot(xs, [100 * r["peak_fraction"] for r in rows], "o--", color="C4", label="of the run's best matmul")
        ax.axhline(100 * 0.70, color="gray", ls=":", label="target 70%")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.set_ylim(0, max(105, 5 + max(100 * max(r["peak_fraction"], r.get("peak_fraction_in_turns", 0))
                                          for r in rows)))
        ax.set_xlabel(key)
        ax.set_ylabel("% of matmul peak")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"route_batch on {results['device']} (matmul peak {results['matmul']['peak_gflops']:.0f} GFLOP/s)")
    fig.tight_layout()
    fig.savefig(out / "route.png", dpi=90)
    plt.close(fig)
    written.append("route.png")

    if results["update"]:
        fig, ax = plt.subplots(figsize=(9, 5))
        labels = [f"B={r['B']}\n{'hot arm' if r['hot_arm'] else 'spread'}" for r in results["update"]]
        series = [("jax_updates_per_s", "update_batch"), ("numpy_updates_per_s", "numpy SM, one at a time"),
                  ("mabwiser_updates_per_s", "MABWiser partial_fit, one at a time")]
        series = [(k, lab) for k, lab in series if all(k in r for r in results["update"])]
        w = 0.8 / len(series)
        for i, (k, lab) in enumerate(series):
            ax.bar([p + i * w for p in range(len(labels))], [r[k] for r in results["update"]], w, label=lab)
        ax.set_xticks([p + w * (len(series) - 1) / 2 for p in range(len(labels))], labels)
        ax.set_yscale("log")
        ax.set_ylabel("updates / s")
        ax.set_title(f"update_batch, K={K0} d={d0}, on {results['device']}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(series))
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "update.png", dpi=90)
        plt.close(fig)
        written.append("update.png")

    if results.get("text"):
        rows = results["text"]
        xs = [r["max_length"] for r in rows]
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, lab, style in (("jax_texts_per_s", "Router.decide (text to decision)", "o-"),
                              ("encode_texts_per_s", "Encoder.embed (encoding alone)", "o:"),
                              ("peer_texts_per_s", "sentence-transformers + MABWiser", "s-"),
                              ("st_encode_texts_per_s", "sentence-transformers encode", "s:")):
            if all(k in r for r in rows):
                ax.plot(xs, [r[k] for r in rows], style, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("max_length (tokens per text)")
        ax.set_ylabel("texts / s")
        ax.set_title(f"text to decision, batches of {rows[0]['texts']}, on {results['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "text.png", dpi=90)
        plt.close(fig)
        written.append("text.png")
    return written


def write(results: dict, out: str | Path) -> list[str]:
    """Write results.json, results.md and the plots into `out`; returns the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "results.md").write_text(markdown(results))
    return ["results.json", "results.md"] + plots(results, out)

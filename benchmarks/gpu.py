"""The accelerator figures in one bounded run (benchmarks/gpu.sh wraps it).

    python -m benchmarks.gpu [--smoke] [--out DIR] [--deadline-s 270] [--copy-to DIR]

On jax.devices()[0] (a CUDA GPU when the CUDA plugin is installed; CPU with JAX_PLATFORMS=cpu):
  - the float32 matmul peak (default precision: TF32 on NVIDIA GPUs), sampled at the start, beside
    every route_batch row and at the end; the run's best sample is the peak;
  - route_batch decisions/s at K = 16, d = 384 for B = 1 .. 65,536 (in_batch_load off), its
    GFLOP/s and fraction of that peak, one row with the in-batch load, and the shard_map path
    (mesh.route_batch on a one-device mesh) at the largest B; arms checked against numpy;
  - text to decision: the fused encoder -> decision computation (router.route_text_batch, no head,
    K = 16) from token ids at max length 128 (every text fills it), texts/s for a few batch sizes
    at the encoder's "highest" precision (the project default) and at "default" (TF32), beside the
    encoder alone; with the MiniLM weights when they are installed, else random weights of
    all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads; the speed does not depend on the
    values); tokenization (host work) is not included;
  - update_batch (Woodbury) and mesh.update_batch(method="stats") (statistics, one device) updates/s;
  - compile time of every entry point (jit(...).lower(...).compile()), apart from run times.

Writes gpu-<device>.json and gpu-<device>.md (the device named) into --out (default
benchmarks/results on a GPU, runs/gpu-bench elsewhere). --smoke: tiny sizes (seconds, any
device), to test the script. Rows past --deadline-s are skipped and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

GOAL_DECISIONS_PER_S = 1_000_000  # route_batch at K = 16, d = 384 on an H100/H200-class GPU


@dataclasses.dataclass(frozen=True)
class Plan:
    K: int = 16
    d: int = 384
    route_B: tuple = (1, 256, 4096, 16384, 65536)
    in_batch_load_B: int = 4096
    update_B: int = 4096
    text_B: tuple = (32, 256, 1024)
    text_L: int = 128
    precisions: tuple = ("highest", "default")
    encoder: str = "minilm"  # "minilm": the real weights if found, else random ones of its shape; "tiny"
    peak_sizes: tuple = (4096, 8192)
    min_time: float = 0.1
    repeat: int = 5
    budget_s: float = 1.0


FULL = Plan()
SMOKE = Plan(K=4, d=64, route_B=(1, 64), in_batch_load_B=64, update_B=64, text_B=(8,), text_L=32,
             precisions=("highest",), encoder="tiny", peak_sizes=(256,), min_time=0.01, repeat=2, budget_s=0.05)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


class Deadline:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _aot(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn.lower(*args, **kw).compile()
    return time.perf_counter() - t0


def bench_route(plan: Plan, peak, suite, res: dict, deadline: Deadline):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import throughput as T
    from mixllm_jax.offline import mesh as M
    from mixllm_jax.core.policy import Policy, route_batch

    K, d = plan.K, plan.d
    st = jax.block_until_ready(T.random_state(K, d))
    A_inv, Bm = np.asarray(st.A_inv), np.asarray(st.B)
    pin, pout = np.asarray(st.price_in), np.asarray(st.price_out)
    rows = [(B, False, "route_batch") for B in plan.route_B]
    rows += [(plan.in_batch_load_B, True, "route_batch"), (max(plan.route_B), False, "mesh.route_batch 1x1")]
    for B, ibl, kind in rows:
        if deadline.left() < 20:
            res["skipped"].append(f"{kind} B={B} in_batch_load={ibl}: deadline")
            continue
        x, p = T.queries(B, d)
        xj, pj = jnp.asarray(x), jnp.asarray(p)
        pol = Policy(**T.ROUTE_POLICY, in_batch_load=ibl)
        if kind == "route_batch":
            compile_s = _aot(route_batch, st, xj, pj, pol)
            call = lambda: route_batch(st, xj, pj, pol)
        else:
            mesh = M.make_mesh(1)
            sst = M.shard_state(st, mesh)
            compile_s = _aot(M._route_fn(mesh, False), sst, xj, pj, pol, None, None, None)
            fn = M._route_fn(mesh, False)  # mesh.route_batch's jitted function, the state in place
            call = lambda: fn(sst, xj, pj, pol, None, None, None)
        side = peak.side_size
        t = T.measure_all({"jax": (lambda: call().arm.block_until_ready(), True),
                           "peak": (peak.fn(side), True, 3)}, suite)
        peak.record(side, t["peak"][0])
        sec = t["jax"][0]
        gflops = T.route_flops(K, d, B) / sec / 1e9
        row = dict(kind=kind, K=K, d=d, B=B, in_batch_load=ibl, compile_s=compile_s, seconds=sec,
                   decisions_per_s=B / sec, gflops=gflops,
                   matmul_in_turns_gflops=2 * side**3 / t["peak"][0] / 1e9)
        row["peak_fraction_in_turns"] = gflops / row["matmul_in_turns_gflops"]
        if not ibl:  # the arms agree with plain numpy LinUCB scoring (first 1024 rows)
            n = min(B, 1024)
            ref = T.numpy_route(A_inv, Bm, pin, pout, x[:n], p[:n], T.ROUTE_POLICY["cost_weight"],
                                T.ROUTE_POLICY["alpha"])
            row["agree_numpy"] = float(np.mean(np.asarray(call().arm)[:n] == ref))
        res["route"].append(row)
        print(f"route {kind} B={B}{' in_batch_load' if ibl else ''}: {row['decisions_per_s']:,.0f}/s, "
              f"{gflops:.1f} GFLOP/s = {100 * row['peak_fraction_in_turns']:.0f}% of a matmul in turns; "
              f"compile {compile_s:.2f} s", flush=True)


def encoder_params(plan: Plan):
    """(params, BertConfig, description): the installed weights, or random ones of their shape."""
    import jax
    import jax.numpy as jnp

    from mixllm_jax.text import bert, encoder as E

    if plan.encoder == "minilm":
        try:
            name, folder = E.resolve_encoder()
            config, _ = E.read_config(folder)
            return E.load_params(folder, config), config, f"{name} (installed weights)"
        except (E.EncoderNotFoundError, OSError, ValueError) as e:
            why = str(e).splitlines()[0][:120]
        config = bert.BertConfig()  # all-MiniLM-L6-v2's shape
        what = f"random weights of all-MiniLM-L6-v2's shape (weights not found: {why})"
    else:
        config = bert.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=128)
        what = "random weights of a tiny BERT (smoke run)"
    dummy = jnp.zeros((1, 2), jnp.int32)
    init = jax.jit(lambda k: bert.BertEncoder(config).init(k, dummy, dummy)["params"])
    return init(jax.random.PRNGKey(0)), config, what


def bench_text(plan: Plan, suite, res: dict, deadline: Deadline):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import throughput as T
    from mixllm_jax.text import encoder as E
    from mixllm_jax.core.policy import Policy
    from mixllm_jax.text.router import route_text_batch

    params, config, what = encoder_params(plan)
    res["text_encoder"] = what
    H, L = config.hidden_size, plan.text_L
    st = jax.block_until_ready(T.random_state(plan.K, H + 1))
    pol = Policy(cost_weight=0.0, alpha=T.PEER_ALPHA, beta=0.0, in_batch_load=False)
    rng = np.random.default_rng(0)
    embed = jax.jit(E.embed_ids, static_argnums=1)
    for prec in plan.precisions:
        cfg = dataclasses.replace(config, precision=prec)
        for B in plan.text_B:
            if deadline.left() < 30:
                res["skipped"].append(f"text B={B} precision={prec}: deadline")
                continue
            low = 1000 if config.vocab_size > 2000 else 1  # past BERT's special and unused ids
            ids = jnp.asarray(rng.integers(low, config.vocab_size, (B, L)), jnp.int32)
            mask = jnp.ones((B, L), jnp.int32)
            pt = jnp.full((B,), float(L), jnp.float32)
            valid = jnp.ones((B,), bool)
            kw = dict(enc_config=cfg, head_shape=None, mode="raw")
            args = (params, None, None, st, ids, mask, pt, pol, valid)
            compile_s = _aot(route_text_batch, *args, **kw)
            enc_compile_s = _aot(embed, params, cfg, ids, mask)
            t = T.measure_all({
                "fused": (lambda: route_text_batch(*args, **kw)[0].arm.block_until_ready(), True),
                "encode": (lambda: embed(params, cfg, ids, mask).block_until_ready(), True)}, suite)
            row = dict(B=B, max_length=L, precision=prec, compile_s=compile_s, encode_compile_s=enc_compile_s,
                       texts_per_s=B / t["fused"][0], encode_texts_per_s=B / t["encode"][0],
                       tokens_per_s=B * L / t["fused"][0])
            res["text"].append(row)
            print(f"text B={B} L={L} precision={prec}: {row['texts_per_s']:,.0f} texts/s fused "
                  f"(encoder alone {row['encode_texts_per_s']:,.0f}/s); compile {compile_s:.1f} s", flush=True)


def bench_update(plan: Plan, suite, res: dict, deadline: Deadline):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import throughput as T
    from mixllm_jax.core import bandit
    from mixllm_jax.offline import mesh as M

    if deadline.left() < 30:
        res["skipped"].append("updates: deadline")
        return
    K, d, B = plan.K, plan.d, plan.update_B
    st = jax.block_until_ready(T.random_state(K, d))
    x, arm, y = T.random_obs(K, d, B, seed=2)
    xj, aj, yj = map(jnp.asarray, (x, arm, y))
    mesh = M.make_mesh(1)
    sst = M.shard_state(st, mesh)
    upd = M._update_fn(mesh)  # method="stats": the statistics path (Woodbury on one device is update_batch)
    c1 = _aot(bandit.update_batch, st, xj, aj, yj)
    from benchmarks.mesh import compile_seconds
    c2 = compile_seconds(upd, sst, xj, aj, yj, None)  # two programs: first call less a steady one
    t = T.measure_all({"woodbury": (lambda: bandit.update_batch(st, xj, aj, yj).A_inv.block_until_ready(), True),
                       "stats": (lambda: upd(sst, xj, aj, yj, None).A_inv.block_until_ready(), True)}, suite)
    th1 = np.asarray(bandit.theta(bandit.update_batch(st, xj, aj, yj)))
    th2 = np.asarray(bandit.theta(upd(sst, xj, aj, yj, None)))
    for kind, key, c in (("update_batch (Woodbury)", "woodbury", c1), ("mesh.update_batch, method=stats", "stats", c2)):
        res["update"].append(dict(kind=kind, K=K, d=d, B=B, compile_s=c, updates_per_s=B / t[key][0]))
        print(f"{kind} B={B}: {B / t[key][0]:,.0f}/s; compile {c:.2f} s", flush=True)
    res["update_theta_max_diff"] = float(np.abs(th1 - th2).max())


def run(plan: Plan, deadline_s: float, command: str) -> dict:
    import jax

    from benchmarks import throughput as T

    t_start = time.perf_counter()
    deadline = Deadline(deadline_s)
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "platform": dev.platform, "n_devices": len(jax.devices()),
           "jax_version": jax.__version__, "python": platform.python_version(), "cpu": T._cpu_name(),
           "cpu_count": os.cpu_count(), "command": command, "plan": dataclasses.asdict(plan),
           "route_policy": T.ROUTE_POLICY, "route": [], "text": [], "update": [], "skipped": [],
           "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                              "XLA_PYTHON_CLIENT_MEM_FRACTION") if k in os.environ}}
    print(f"device {dev.platform}:{dev.device_kind} ({res['n_devices']} device(s)), jax {jax.__version__}", flush=True)
    suite = T.Suite(peak_sizes=plan.peak_sizes, min_time=plan.min_time, repeat=plan.repeat, budget_s=plan.budget_s)
    peak = T.MatmulPeak(suite)
    try:
        peak.measure_sizes()
        print(f"matmul peak: {peak.peak:,.0f} GFLOP/s float32 ({peak.precision})", flush=True)
        for section in (bench_route, bench_text, bench_update):
            try:
                if section is bench_route:
                    bench_route(plan, peak, suite, res, deadline)
                else:
                    section(plan, suite, res, deadline)
            except Exception as e:  # a failed section is reported; the others still run
                res.setdefault("errors", []).append(f"{section.__name__}: {type(e).__name__}: {e}"[:2000])
                print(f"{section.__name__} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if deadline.left() > 10:
            peak.measure_sizes()
    except KeyboardInterrupt:  # gpu.sh's hard limit (SIGINT): keep what was measured
        res.setdefault("errors", []).append("interrupted by the time limit")
    finally:
        res["matmul"] = peak.to_dict() if peak.gflops else None
        peak.release()
        for r in res["route"]:
            if res["matmul"]:
                r["peak_fraction"] = r["gflops"] / res["matmul"]["peak_gflops"]
        res["wall_s"] = time.perf_counter() - t_start
    return res


def _rate(v):
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown(res: dict) -> str:
    dev = f"{res['device']} ({res['platform']})"
    out = [f"# mixllm-jax on {res['device']}", "",
           f"- device: **{dev}**, {res['n_devices']} visible; host {res['cpu']} ({res['cpu_count']} cores); "
           f"jax {res['jax_version']}, Python {res['python']}",
           f"- command: `{res['command']}`; wall {res['wall_s']:.0f} s"]
    if res.get("matmul"):
        m = res["matmul"]
        out.append(f"- float32 matmul peak: **{m['peak_gflops']:,.0f} GFLOP/s** ({m['precision']}; "
                   + ", ".join(f"n={n}: {g:,.0f}" for n, g in m["gflops_by_size"].items()) + "), the run's best sample")
    plain = [r for r in res["route"] if r["kind"] == "route_batch" and not r["in_batch_load"]]
    best = max(plain, key=lambda r: r["decisions_per_s"], default=None)
    out += ["", "## Target", "", "| target | goal | measured | status |", "|---|---|---|---|"]
    if best:
        status = "MET" if best["decisions_per_s"] >= GOAL_DECISIONS_PER_S else "missed"
        if res["platform"] == "cpu":
            status += " (CPU run: the goal is for an H100/H200-class GPU)"
        out.append(f"| route_batch decisions/s, K={best['K']}, d={best['d']} | >= {GOAL_DECISIONS_PER_S:,} | "
                   f"{best['decisions_per_s']:,.0f} at B={best['B']} | {status} |")
    else:
        out.append("| route_batch decisions/s | >= 1,000,000 | not measured | - |")
    out += ["", "## route_batch", "",
            "| entry point | B | K | d | in-batch load | decisions/s | GFLOP/s | of matmul in turns | of run's peak "
            "| same arms as numpy | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["route"]:
        out.append(f"| {r['kind']} | {r['B']} | {r['K']} | {r['d']} | {'on' if r['in_batch_load'] else 'off'} | "
                   f"{_rate(r['decisions_per_s'])} | {r['gflops']:,.1f} | {100 * r['peak_fraction_in_turns']:.0f}% | "
                   + (f"{100 * r['peak_fraction']:.0f}%" if "peak_fraction" in r else "-") + " | "
                   + (f"{100 * r['agree_numpy']:.1f}%" if "agree_numpy" in r else "-") + f" | {r['compile_s']:.2f} |")
    out += ["", "## Text to decision (token ids -> encoder -> LinUCB decision, fused)", "",
            f"Encoder: {res.get('text_encoder', '-')}. Every text fills max_length; no head (raw features, "
            f"d = hidden + 1), K = {res['plan']['K']}; tokenization (host) not included.", "",
            "| B | max length | encoder precision | texts/s fused | tokens/s | encoder alone texts/s | compile s "
            "(fused) | compile s (encoder) |", "|---|---|---|---|---|---|---|---|"]
    for r in res["text"]:
        out.append(f"| {r['B']} | {r['max_length']} | {r['precision']} | {_rate(r['texts_per_s'])} | "
                   f"{_rate(r['tokens_per_s'])} | {_rate(r['encode_texts_per_s'])} | {r['compile_s']:.2f} | "
                   f"{r['encode_compile_s']:.2f} |")
    out += ["", "## Updates", "", "| entry point | B | K | d | updates/s | compile s |", "|---|---|---|---|---|---|"]
    for r in res["update"]:
        out.append(f"| {r['kind']} | {r['B']} | {r['K']} | {r['d']} | {_rate(r['updates_per_s'])} | {r['compile_s']:.2f} |")
    if "update_theta_max_diff" in res:
        out.append(f"\nThe two updates' theta differ by at most {res['update_theta_max_diff']:.1e}.")
    if res["skipped"]:
        out += ["", "Skipped (past the deadline): " + "; ".join(res["skipped"])]
    if res.get("errors"):
        out += ["", "Errors: " + "; ".join(res["errors"])]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: tests the script in seconds on any device")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results on a GPU, runs/gpu-bench elsewhere)")
    ap.add_argument("--deadline-s", type=float, default=270.0, help="skip rows that would start past this")
    ap.add_argument("--copy-to", type=Path, default=None, help="also copy the outputs into this folder")
    args = ap.parse_args(argv)
    import jax

    dev = jax.devices()[0]
    out = args.out or (Path("benchmarks/results") if dev.platform == "gpu" else Path("runs/gpu-bench"))
    command = "benchmarks/gpu.sh " + " ".join(sys.argv[1:] if argv is None else argv)
    res = run(SMOKE if args.smoke else FULL, args.deadline_s, command.strip())
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{slug(dev.device_kind)}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(markdown(res))
    print(f"wrote {out / (name + '.md')} and {out / (name + '.json')}")
    if args.copy_to is not None:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".json"):
            shutil.copy(out / (name + suffix), args.copy_to / (name + suffix))
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Sharded vs unsharded route_batch (and updates) on forced host devices: a correctness check.

    python -m benchmarks.mesh [--devices 4] [--K 16] [--d 384] [--B 1024 4096 16384] [--quick] [--out DIR]

Runs on CPU host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N is set here when jax
has not started and the flag is absent). For each batch size: `policy.route_batch` on one device
next to `mesh.route_batch` on a N x 1 (batch-parallel), 1 x N (arm-parallel) and, for N = 4, 2 x 2
mesh: decisions/s (all layouts sampled in turns, best sample kept), compile time, and whether the
sharded decisions equal the unsharded ones (same arms, largest score difference). Then updates:
`bandit.update_batch` (Woodbury, one device) next to `mesh.update_batch` (statistics reduced over
the devices, A_inv recomputed) and `mesh.update_batch(method="woodbury")`. The forced host devices share this machine's cores, so these
rates say that the sharded programs run and agree, not how they scale; writes mesh.json and
mesh.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _rows(t: dict, B: int, rate: str, compile_s: dict, agree: dict) -> list[dict]:
    """One result row per layout of T.measure_all's {layout: (seconds, _)}: its rate (`rate`: B per
    second), seconds, compile time, speed against one device and its agreement figures."""
    return [dict(B=B, layout=name, **{rate: B / sec}, seconds=sec, compile_s=compile_s[name],
                 vs_1_device=t["1 device"][0] / sec, **agree.get(name, {})) for name, (sec, _) in t.items()]


def _force_host_devices(n: int) -> None:
    """N host devices and one BLAS thread each (N devices already run at once: more threads
    oversubscribe the cores, and LAPACK's eigh slowed down 10-100x on a loaded 2-core machine)."""
    if "jax" in sys.modules or "numpy" in sys.modules:
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def compile_seconds(fn, *args) -> float:
    """jit(...).lower(...).compile() time; for a function of several programs (no .lower), the
    first call less a steady one."""
    import jax

    t0 = time.perf_counter()
    if hasattr(fn, "lower"):
        fn.lower(*args).compile()
        return time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return max(first - (time.perf_counter() - t0), 0.0)


def layouts(n: int) -> list[tuple[int, int]]:
    """(batch, arms) shards: N x 1, 1 x N, and a square one when N is a square > 1."""
    out = [(n, 1), (1, n)]
    r = int(round(n ** 0.5))
    if r * r == n and r > 1:
        out.append((r, r))
    return list(dict.fromkeys(out))


def run(devices: int = 4, K: int = 16, d: int = 384, Bs=(1024, 4096, 16384), update_B: int = 4096,
        min_time: float = 0.2, repeat: int = 5, budget_s: float = 2.0) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import throughput as T
    from mixllm_jax.core import bandit
    from mixllm_jax.offline import mesh as M
    from mixllm_jax.core.policy import Policy, route_batch

    cpus = jax.devices("cpu")
    if len(cpus) < devices:
        raise SystemExit(f"{len(cpus)} CPU devices, {devices} asked: start python with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    suite = T.Suite(min_time=min_time, repeat=repeat, budget_s=budget_s)
    st = jax.device_put(T.random_state(K, d), cpus[0])
    pol = Policy(**T.ROUTE_POLICY, in_batch_load=False)
    lays = layouts(devices)
    meshes = {lay: M.make_mesh(cpus[:devices], arms=lay[1]) for lay in lays}
    placed = {lay: M.shard_state(st, m) for lay, m in meshes.items()}
    res = {"devices": f"{devices} x {cpus[0].device_kind} (forced host devices)", "cpu_count": os.cpu_count(),
           "jax_version": jax.__version__, "K": K, "d": d, "route": [], "update": [],
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "-"),
           "load_average_start": T._load()}
    for B in Bs:
        x, p = T.queries(B, d)
        xj, pj = jax.device_put(jnp.asarray(x), cpus[0]), jax.device_put(jnp.asarray(p), cpus[0])
        fns, compile_s = {}, {}
        t0 = time.perf_counter()
        route_batch.lower(st, xj, pj, pol).compile()
        compile_s["1 device"] = time.perf_counter() - t0
        fns["1 device"] = (lambda: route_batch(st, xj, pj, pol).arm.block_until_ready(), True)
        ref = route_batch(st, xj, pj, pol)
        agree = {}
        for lay, m in meshes.items():
            name = f"{lay[0]}x{lay[1]}"
            xs = jax.device_put(x, M.NamedSharding(m, M.P(M.BATCH)))
            ps = jax.device_put(p, M.NamedSharding(m, M.P(M.BATCH)))
            fn, s = M._route_fn(m, False), placed[lay]
            t0 = time.perf_counter()
            fn.lower(s, xs, ps, pol, None, None, None).compile()
            compile_s[name] = time.perf_counter() - t0
            fns[name] = (lambda fn=fn, s=s, xs=xs, ps=ps: fn(s, xs, ps, pol, None, None, None).arm.block_until_ready(), True)
            got = M.route_batch(s, xs, ps, pol, mesh=m)
            sc, rs = np.asarray(got.score), np.asarray(ref.score)
            fin = np.isfinite(rs)
            agree[name] = dict(same_arms=float(np.mean(np.asarray(got.arm) == np.asarray(ref.arm))),
                               max_score_diff=float(np.abs(sc[fin] - rs[fin]).max()),
                               inf_pattern_equal=bool(np.array_equal(np.isinf(sc), ~fin)))
        for row in _rows(T.measure_all(fns, suite), B, "decisions_per_s", compile_s, agree):
            res["route"].append(row)
            print(_route_line(row), flush=True)

    # updates: Woodbury on one device vs the mesh's two methods on the N x 1 and 1 x N layouts
    x, arm, y = T.random_obs(K, d, update_B, seed=3)
    xj, aj, yj = (jax.device_put(jnp.asarray(a), cpus[0]) for a in (x, arm, y))
    fns, compile_s, agree = {}, {}, {}
    t0 = time.perf_counter()
    bandit.update_batch.lower(st, xj, aj, yj).compile()
    compile_s["1 device"] = time.perf_counter() - t0
    fns["1 device"] = (lambda: bandit.update_batch(st, xj, aj, yj).A_inv.block_until_ready(), True)
    th_ref = np.asarray(bandit.theta(bandit.update_batch(st, xj, aj, yj)))
    for lay, m in meshes.items():
        if lay[0] > 1 and lay[1] > 1:
            continue
        for method, fn in (("woodbury", M._woodbury_fn(m)), ("stats", M._update_fn(m))):
            name, s = f"{lay[0]}x{lay[1]} {method}", placed[lay]
            compile_s[name] = compile_seconds(fn, s, x, arm, y, None)
            fns[name] = (lambda fn=fn, s=s: fn(s, x, arm, y, None).A_inv.block_until_ready(), True)
            th = np.asarray(bandit.theta(fn(s, x, arm, y, None)))
            agree[name] = dict(max_theta_diff=float(np.abs(th - th_ref).max()))
    for row in _rows(T.measure_all(fns, suite), update_B, "updates_per_s", compile_s, agree):
        res["update"].append(row)
        print(_update_line(row), flush=True)
    res["load_average_end"] = T._load()
    return res


def _route_line(r):
    s = f"route B={r['B']} {r['layout']}: {r['decisions_per_s']:,.0f}/s ({r['vs_1_device']:.2f}x one device)"
    if "same_arms" in r:
        s += f", same arms {100 * r['same_arms']:.1f}%, max |score diff| {r['max_score_diff']:.1e}"
    return s + f"; compile {r['compile_s']:.2f} s"


def _update_line(r):
    s = f"update B={r['B']} {r['layout']}: {r['updates_per_s']:,.0f}/s ({r['vs_1_device']:.2f}x one device)"
    if "max_theta_diff" in r:
        s += f", max |theta diff| {r['max_theta_diff']:.1e}"
    return s + f"; compile {r['compile_s']:.2f} s"


def markdown(res: dict, command: str) -> str:
    out = ["# Sharded vs unsharded route_batch on forced host devices", "",
           f"- devices: {res['devices']}, on {res['cpu_count']} CPU cores; jax {res['jax_version']}",
           f"- K = {res['K']} arms, d = {res['d']}; command: `{command}`",
           f"- XLA_FLAGS `{res['xla_flags']}`, OPENBLAS_NUM_THREADS {res['openblas_threads']}; load average "
           f"{res.get('load_average_start')} at the start, {res.get('load_average_end')} at the end (other jobs)",
           "- a correctness check, not a speed claim: the host devices share this machine's cores, and one "
           "device already uses all of them (XLA's thread pool), so no layout can beat it here. The rates show "
           "that the sharded programs run; the columns on the right, that they decide what one device decides.",
           "", "## route_batch (in_batch_load off)", "",
           "| B | layout (batch x arms) | decisions/s | vs 1 device | same arms | max abs score diff | compile s |",
           "|---|---|---|---|---|---|---|"]
    for r in res["route"]:
        out.append(f"| {r['B']} | {r['layout']} | {r['decisions_per_s']:,.0f} | {r['vs_1_device']:.2f}x | "
                   + (f"{100 * r['same_arms']:.1f}% | {r['max_score_diff']:.1e}" if "same_arms" in r else "- | -")
                   + f" | {r['compile_s']:.2f} |")
    out += ["", "## updates: Woodbury on one device vs the mesh's Woodbury (arm blocks) and statistics (psum)", "",
            "| B | layout | updates/s | vs 1 device | max abs theta diff | compile s |", "|---|---|---|---|---|---|"]
    for r in res["update"]:
        out.append(f"| {r['B']} | {r['layout']} | {r['updates_per_s']:,.0f} | {r['vs_1_device']:.2f}x | "
                   + (f"{r['max_theta_diff']:.1e}" if "max_theta_diff" in r else "-") + f" | {r['compile_s']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mesh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4, help="forced host devices (default 4)")
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--B", type=int, nargs="+", default=[1024, 4096, 16384], help="batch sizes")
    ap.add_argument("--update-B", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, short samples (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("runs/mesh"), help="folder for mesh.json and mesh.md")
    args = ap.parse_args(argv)
    _force_host_devices(args.devices)
    kw = dict(devices=args.devices, K=args.K, d=args.d, Bs=tuple(args.B), update_B=args.update_B)
    if args.quick:
        kw.update(K=8, d=32, Bs=(64,), update_B=64, min_time=0.01, repeat=2, budget_s=0.05)
    res = run(**kw)
    command = "python -m benchmarks.mesh " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mesh.json").write_text(json.dumps(res, indent=1))
    (args.out / "mesh.md").write_text(markdown(res, command))
    print(f"wrote {args.out / 'mesh.json'} and {args.out / 'mesh.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

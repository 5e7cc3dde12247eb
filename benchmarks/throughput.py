"""Throughput of the engine's entry points next to a plain numpy implementation, in one run.

    python -m benchmarks.throughput [--quick] [--out DIR]

Times exclude compilation (reported separately) and use block_until_ready(); figures on these
2-core machines are noisy, so compare the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mixllm_jax import bandit, state as S
from mixllm_jax.policy import Policy, route_batch


def timeit(fn, *, repeat=5, min_time=0.2):
    """Median seconds per call of fn() (which must block), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_time:
                break
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times))


def random_state(K, d, n_obs=None, seed=0):
    """A state with K active arms, each fitted on a few random observations."""
    rng = np.random.default_rng(seed)
    st = S.init_state(K, d)
    for k in range(K):
        st = S.add_arm(st, k, price_in=1e-6 * (k + 1), price_out=3e-6 * (k + 1))
    n = n_obs or 4 * K
    x = rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    y = rng.normal(size=(n, 2)).astype(np.float32)
    return bandit.update_batch(st, jnp.asarray(x), jnp.asarray(rng.integers(0, K, n)), jnp.asarray(y))


# ---- numpy references -------------------------------------------------------------------------

def numpy_route(A_inv, B, price_in, price_out, x, p_tok, cost_weight, alpha):
    """Plain numpy LinUCB scoring with the same components: x [B, d] -> arm [B]."""
    theta = A_inv @ B  # [K, d, T]
    y = np.einsum("bi,kit->bkt", x, theta, optimize=True)
    z = np.matmul(x[None], A_inv)  # [K, B, d]
    u = np.sqrt(np.maximum((z * x[None]).sum(-1), 0)).T
    cost = p_tok[:, None] * price_in + np.exp(np.clip(y[..., 1], 0, 12)) * price_out
    return np.argmax(y[..., 0] - cost_weight * cost + alpha * u, axis=1)


def numpy_update(A_inv, B, x, arm, y):
    """Plain numpy Sherman-Morrison, one observation at a time."""
    for i in range(len(x)):
        k, xi = arm[i], x[i]
        u = A_inv[k] @ xi
        A_inv[k] -= np.outer(u, u) / (1.0 + xi @ u)
        B[k] += np.outer(xi, y[i])


# ---- benchmarks --------------------------------------------------------------------------------

def bench_route(K, d, Bsz, in_batch_load=False):
    st = random_state(K, d)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(Bsz, d)).astype(np.float32) / np.sqrt(d)
    p = np.full(Bsz, 200.0, np.float32)
    pol = Policy(cost_weight=100.0, alpha=0.01, beta=0.1, in_batch_load=in_batch_load)
    xj, pj = jnp.asarray(x), jnp.asarray(p)
    t0 = time.perf_counter()
    route_batch.lower(st, xj, pj, pol).compile()
    compile_s = time.perf_counter() - t0
    jax_s = timeit(lambda: route_batch(st, xj, pj, pol).arm.block_until_ready())
    A_inv, B = np.asarray(st.A_inv), np.asarray(st.B)
    pin, pout = np.asarray(st.price_in), np.asarray(st.price_out)
    np_s = timeit(lambda: numpy_route(A_inv, B, pin, pout, x, p, 100.0, 0.01), repeat=3)
    flops = 2 * Bsz * K * d * d + 2 * Bsz * K * d * 3  # A_inv x products dominate
    return dict(K=K, d=d, B=Bsz, in_batch_load=in_batch_load, compile_s=compile_s,
                jax_decisions_per_s=Bsz / jax_s, numpy_decisions_per_s=Bsz / np_s,
                speedup_vs_numpy=np_s / jax_s, jax_gflops=flops / jax_s / 1e9)


def bench_update(K, d, Bsz, hot):
    st = random_state(K, d)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(Bsz, d)).astype(np.float32) / np.sqrt(d)
    y = rng.normal(size=(Bsz, 2)).astype(np.float32)
    arm = np.zeros(Bsz, np.int32) if hot else rng.integers(0, K, Bsz).astype(np.int32)
    xj, aj, yj = map(jnp.asarray, (x, arm, y))
    t0 = time.perf_counter()
    bandit.update_batch.lower(st, xj, aj, yj).compile()
    compile_s = time.perf_counter() - t0
    jax_s = timeit(lambda: bandit.update_batch(st, xj, aj, yj).A_inv.block_until_ready())
    n_np = min(Bsz, 512)
    A_inv, B = np.array(st.A_inv), np.array(st.B)
    np_s = timeit(lambda: numpy_update(A_inv, B, x[:n_np], arm[:n_np], y[:n_np]), repeat=3) / n_np * Bsz
    return dict(K=K, d=d, B=Bsz, hot_arm=hot, compile_s=compile_s, jax_updates_per_s=Bsz / jax_s,
                numpy_updates_per_s=Bsz / np_s, speedup_vs_numpy=np_s / jax_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the headline configuration")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="where results.json goes")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    results = {"device": f"{dev.platform}:{dev.device_kind}", "machine": platform.processor() or platform.machine(),
               "route": [bench_route(16, 384, 4096), bench_route(16, 384, 4096, in_batch_load=True)],
               "update": [bench_update(16, 384, 4096, hot=False), bench_update(16, 384, 4096, hot=True)]}
    for r in results["route"]:
        print(f"route_batch K={r['K']} d={r['d']} B={r['B']} in_batch_load={r['in_batch_load']}: "
              f"{r['jax_decisions_per_s']:,.0f}/s (numpy {r['numpy_decisions_per_s']:,.0f}/s, "
              f"x{r['speedup_vs_numpy']:.1f}; {r['jax_gflops']:.1f} GFLOP/s; compile {r['compile_s']:.2f} s)")
    for r in results["update"]:
        print(f"update_batch K={r['K']} d={r['d']} B={r['B']} hot_arm={r['hot_arm']}: "
              f"{r['jax_updates_per_s']:,.0f}/s (numpy one at a time {r['numpy_updates_per_s']:,.0f}/s, "
              f"x{r['speedup_vs_numpy']:.1f}; compile {r['compile_s']:.2f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()

"""Throughput of the engine's entry points next to its peers, measured in one run.

    python -m benchmarks.throughput [--quick] [--out DIR] [--no-peers] [--no-text]
    mixllm-jax bench [same options]

Measures, on jax.devices()[0] (CPU, or a GPU with JAX_PLATFORMS=cuda):
  - this device's float32 matmul peak (large jnp matmuls, default precision);
  - route_batch decisions/s sweeping B (1..16384), K (2..256) and d (64..1024) one at a time
    around K=16, d=384, B=4096, with its achieved GFLOP/s and fraction of that peak, next to a
    plain numpy LinUCB (same components; the arms it picks are checked against route_batch's) and
    MABWiser's LinUCB `predict` on the same fitted data;
  - update_batch updates/s, observations spread over the arms and all on one hot arm, next to numpy
    Sherman-Morrison and MABWiser `partial_fit`, both one observation at a time;
  - text to decision per second (a Router trained on RouterBench queries, no head, deciding on
    RouterBench prompts truncated to max_length 32..256) and encoding alone, next to
    sentence-transformers (torch CPU) + MABWiser `predict`, and sentence-transformers alone; the
    transformer's achieved GFLOP/s and fraction of the matmul peak; the same for the static tier
    (a Router on the static encoder distilled from the same MiniLM, `--static DIR`; distilled into
    the cache directory on first use);
  - with --http: the router service on the static tier end to end (benchmarks/loadgen.py: /v1/route
    at concurrency 1 and 64 on loopback);
  - compile time of every entry point (first call minus a steady call), apart from run times.

Writes results.json, results.md (tables) and route.png, update.png, text.png into --out. Times use
block_until_ready() and exclude compilation. Figures on a shared 2-core machine are noisy: the
ratios of figures measured in the same run are what to compare (see results.md for the targets).
Peers that are not installed (`pip install -e '.[bench]'`) are skipped, and the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixllm_jax.core import bandit, state as S
from mixllm_jax.core.policy import Policy, route_batch

# The timed routing policy (numbers traced; in_batch_load off: the pure scoring that numpy and
# MABWiser also do; the center configuration is also timed with in_batch_load on).
ROUTE_POLICY = dict(cost_weight=100.0, alpha=0.01, beta=0.1)
PEER_ALPHA = 0.01  # MABWiser LinUCB alpha, and route_batch's in the agreement check
TARGETS = dict(route_vs_mabwiser=5.0, update_vs_mabwiser=300.0, route_peak_fraction=0.70,
               text_vs_peer=1.0, static_text_vs_peer=50.0, http_static_rps_c64=1000.0, http_static_p50_ms_c1=10.0)
STATIC_TARGET_LENGTH = 128  # the static tier's target is met at this max_length
HTTP_LEVELS = (1, 64)


@dataclasses.dataclass(frozen=True)
class Suite:
    """What one run measures. center = (K, d, B): the sweeps vary one of them at a time."""

    center: tuple = (16, 384, 4096)
    route_B: tuple = (1, 4, 16, 64, 256, 1024, 4096, 16384)
    route_K: tuple = (2, 4, 8, 16, 32, 64, 128, 256)
    route_d: tuple = (64, 128, 256, 384, 512, 768, 1024)
    update_B: tuple = (256, 1024, 4096, 16384)
    text_lengths: tuple = (32, 64, 128, 256)
    text_batch: int = 32  # a Router batch bucket, so no padding rows are encoded
    text_train: int = 300  # RouterBench queries the benchmark Router is trained on
    peak_sizes: tuple = (1024, 2048, 4096)  # n of the n x n matmuls (CPU; a GPU uses larger)
    peer_updates: int = 32  # MABWiser partial_fit calls timed
    numpy_updates: int = 256  # numpy Sherman-Morrison steps timed
    min_time: float = 0.2  # seconds per timing sample
    repeat: int = 5  # samples at most (the best is taken)
    budget_s: float = 2.0  # sampling time per measured function, about


FULL = Suite()
QUICK = Suite(route_B=(1, 64, 4096), route_K=(4, 16), route_d=(128, 384), update_B=(4096,),
              text_lengths=(32, 128), text_batch=32, text_train=64, peak_sizes=(2048,),
              peer_updates=8, numpy_updates=64, min_time=0.05, repeat=3, budget_s=0.6)


# ---- timing ------------------------------------------------------------------------------------

def measure_all(fns: dict, suite: Suite) -> dict[str, tuple[float, float]]:
    """{name: (seconds per call, seconds of the first call)} of fns {name: (fn, jitted[, max samples])}.

    The functions are sampled in turns (one sample of each, then again), so the load of other jobs
    on a shared machine falls on all of them alike, and each keeps its best sample (others only ever
    slow a sample down): up to suite.repeat samples of >= suite.min_time each, at least two, within
    about suite.budget_s per function. fn() must block. jitted: the first call compiles and is no
    sample; otherwise (numpy, peers) it is one.
    """
    fns = {k: v if len(v) == 3 else (*v, suite.repeat) for k, v in fns.items()}  # (fn, jitted, max samples)
    first, times = {}, {k: [] for k in fns}
    for k, (fn, jitted, _) in fns.items():
        t0 = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t0
        if not jitted:
            times[k].append(first[k])
    deadline = time.perf_counter() + suite.budget_s * len(fns)
    while True:
        todo = [k for k in fns if len(times[k]) < min(fns[k][2], suite.repeat)]
        if time.perf_counter() >= deadline:
            todo = [k for k in todo if len(times[k]) < 2]
        if not todo:
            break
        for k in todo:
            fn = fns[k][0]
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= suite.min_time or time.perf_counter() >= deadline:
                    break
            times[k].append(elapsed / n)
    return {k: (float(min(times[k])), first[k]) for k in fns}


def measure(fn: Callable[[], object], suite: Suite, jitted: bool = True) -> tuple[float, float]:
    """(seconds per call, seconds of the first call) of one function: see measure_all."""
    return measure_all({"f": (fn, jitted)}, suite)["f"]


def compile_time(first: float, steady: float) -> float:
    """Tracing + compilation: the first call less a steady call."""
    return max(first - steady, 0.0)


def aot_compile_time(jitted, *args, seen: set | None = None, key=None) -> float | None:
    """Seconds to trace, lower and compile a jitted function for these arguments (nothing runs).

    None when `key` is in `seen` (the same shapes were compiled for an earlier row: JAX reuses it).
    """
    if seen is not None:
        if key in seen:
            return None
        seen.add(key)
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def timeit(fn, *, repeat=5, min_time=0.2):
    """Best seconds per call of fn() (which must block), after one warm-up call."""
    return measure(fn, dataclasses.replace(FULL, repeat=repeat, min_time=min_time, budget_s=1e9))[0]


# ---- states and data ---------------------------------------------------------------------------

def random_obs(K, d, n_obs=None, seed=0):
    """n_obs (default 4K) random observations: x [n, d] (bias last), arm [n], targets [n, 2]."""
    rng = np.random.default_rng(seed)
    n = n_obs or 4 * K
    x = rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    x[:, -1] = 1.0
    y = rng.normal(size=(n, 2)).astype(np.float32)
    return x, rng.integers(0, K, n).astype(np.int32), y


def random_state(K, d, n_obs=None, seed=0):
    """A state with K active arms, each fitted on a few random observations (the arms alone: the
    shared online component stays at its prior, so the numpy references hold)."""
    st = S.init_state(K, d)
    for k in range(K):
        st = S.add_arm(st, k, price_in=1e-6 * (k + 1), price_out=3e-6 * (k + 1))
    x, arm, y = random_obs(K, d, n_obs, seed)
    return bandit.update_arms(st, jnp.asarray(x), jnp.asarray(arm), jnp.asarray(y))


def queries(B, d, seed=1):
    """B query feature rows [B, d] (bias last) and their prompt tokens [B]."""
    x = np.random.default_rng(seed).normal(size=(B, d)).astype(np.float32) / np.sqrt(d)
    x[:, -1] = 1.0
    return x, np.full(B, 200.0, np.float32)


# ---- numpy references --------------------------------------------------------------------------

def numpy_route(A_inv, B, price_in, price_out, x, p_tok, cost_weight, alpha):
    """Plain numpy LinUCB scoring with the same components: x [B, d] -> arm [B]. Quality is
    clipped to [0, 1] (the targets' range) and log tokens to [0, 12], as the router's are."""
    theta = A_inv @ B  # [K, d, T]
    y = np.einsum("bi,kit->bkt", x, theta, optimize=True)
    z = np.matmul(x[None], A_inv)  # [K, B, d]
    u = np.sqrt(np.maximum((z * x[None]).sum(-1), 0)).T
    cost = p_tok[:, None] * price_in + np.exp(np.clip(y[..., 1], 0, 12)) * price_out
    return np.argmax(np.clip(y[..., 0], 0, 1) - cost_weight * cost + alpha * u, axis=1)


def numpy_update(A_inv, B, x, arm, y):
    """Plain numpy Sherman-Morrison, one observation at a time."""
    for i in range(len(x)):
        k, xi = arm[i], x[i]
        u = A_inv[k] @ xi
        A_inv[k] -= np.outer(u, u) / (1.0 + xi @ u)
        B[k] += np.outer(xi, y[i])


def encoder_flops(L, hidden=384, layers=6, intermediate=1536):
    """Multiply-adds x 2 of one text of L tokens through a BERT (MiniLM-L6 by default): the four
    attention projections and the two feed-forward matmuls per token and layer, plus QK^T and AV."""
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * 2 * L * hidden
    return layers * L * per_token


def route_flops(K, d, B, T=2):
    """Multiply-adds x 2 of a route: A_inv x and x.(A_inv x) per arm, predictions, and theta."""
    return 2 * B * K * d * (d + 1 + T) + 2 * K * d * d * T


# ---- the suite ---------------------------------------------------------------------------------

class Workspace:
    """Per-run caches (fitted states and peer models per (K, d)), peer availability, progress."""

    def __init__(self, suite: Suite, peers_on: bool = True, text_on: bool = True, progress: bool = True,
                 static: str | None = "auto"):
        from benchmarks import peers

        self.suite = suite
        self.static = static  # the static encoder's folder; "auto": distilled into the cache dir; None: off
        self.peers: dict[str, dict] = {}
        for name, find in (("mabwiser", peers.find_mabwiser),
                           ("sentence-transformers", peers.find_sentence_transformers)):
            if not peers_on:
                self.peers[name] = {"version": None, "skipped": "--no-peers"}
            elif name == "sentence-transformers" and not text_on:
                self.peers[name] = {"version": None, "skipped": "--no-text"}
            else:
                version, why = find()
                self.peers[name] = {"version": version, "skipped": why}
        self._states: dict = {}
        self.compiled: set = set()  # (entry point, shapes) whose compile time is reported
        self.peak = MatmulPeak(suite)
        self._bar = None
        self.progress = progress

    def static_dir(self) -> Path | None:
        """The static encoder folder (distilled from the default MiniLM on first use for "auto")."""
        if self.static is None:
            return None
        if self.static != "auto":
            return Path(self.static)
        from mixllm_jax.text import cache, static_distill

        folder = cache.default_cache_dir() / "static-encoder"
        if not (folder / "model.safetensors").is_file():
            self.log(f"static tier: distilling a static encoder into {folder} (once; about a minute)")
            static_distill.distill(folder, progress=False)
        return folder

    def has(self, peer: str) -> bool:
        return self.peers[peer]["version"] is not None

    def state(self, K, d):
        """(state, obs, MABWiser model or None) for (K, d); keeps the center's and the last one's."""
        key = (K, d)
        if key not in self._states:
            for k in [k for k in self._states if k != tuple(self.suite.center[:2])]:
                del self._states[k]
            obs = random_obs(K, d)
            st = random_state(K, d)
            mab = None
            if self.has("mabwiser"):
                from benchmarks import peers
                mab = peers.mabwiser_linucb(obs[0], obs[1], obs[2][:, 0], K, PEER_ALPHA, 1.0)
            self._states[key] = (jax.block_until_ready(st), obs, mab)
        return self._states[key]

    def log(self, line: str):
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def step(self, what: str):
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            self._bar.update(1)


class MatmulPeak:
    """This device's float32 matmul rate (GFLOP/s) on n x n jnp matmuls, default precision.

    The best sample of the whole run counts: sizes suite.peak_sizes at the start and the end, and the
    size that was fastest at the start again beside every route_batch configuration, sampled in turns
    with it (on a shared machine that sample is the peak the configuration could reach then).
    """

    def __init__(self, suite: Suite):
        dev = jax.devices()[0]
        self.suite = suite
        self.sizes = suite.peak_sizes if dev.platform == "cpu" else \
            tuple(sorted({4096, 8192, 16384} | set(suite.peak_sizes)))
        self.precision = "default (TF32 on NVIDIA GPUs)" if dev.platform == "gpu" else "default"
        self.gflops: dict[str, float] = {}
        self.samples = 0
        self._mm = jax.jit(lambda a, b: a @ b)
        self._args: dict[int, tuple] = {}

    def fn(self, n: int):
        if n not in self._args:
            k1, k2 = jax.random.split(jax.random.PRNGKey(n))
            self._args[n] = (jax.random.normal(k1, (n, n), jnp.float32), jax.random.normal(k2, (n, n), jnp.float32))
        a, b = self._args[n]
        return lambda: self._mm(a, b).block_until_ready()

    def record(self, n: int, seconds: float):
        self.samples += 1
        self.gflops[str(n)] = max(self.gflops.get(str(n), 0.0), 2 * n**3 / seconds / 1e9)

    def measure_sizes(self):
        for n in self.sizes:
            self.record(n, measure(self.fn(n), self.suite)[0])

    @property
    def side_size(self) -> int:
        return int(max(self.gflops, key=self.gflops.get)) if self.gflops else self.sizes[-1]

    @property
    def peak(self) -> float:
        return max(self.gflops.values())

    def to_dict(self) -> dict:
        return {"gflops_by_size": dict(self.gflops), "peak_gflops": self.peak, "dtype": "float32",
                "precision": self.precision,
                "measured": f"at the start and the end of the run and beside every route_batch "
                            f"configuration (n={self.side_size}); the best sample counts",
                "side_size": self.side_size}

    def release(self):
        self._args.clear()


def bench_route(ws: Workspace, K, d, B, in_batch_load=False) -> dict:
    """One route_batch configuration, with the numpy reference and MABWiser predict beside it.

    All of them (and a matmul for the peak) are sampled in turns. peak_fraction is set from the
    run's best matmul sample at the end of the run.
    """
    suite = ws.suite
    st, _, mab = ws.state(K, d)
    x, p = queries(B, d)
    pol = Policy(**ROUTE_POLICY, in_batch_load=in_batch_load)
    xj, pj = jnp.asarray(x), jnp.asarray(p)
    out = {}
    compile_s = aot_compile_time(route_batch, st, xj, pj, pol, seen=ws.compiled,
                                 key=("route_batch", K, d, B, in_batch_load))
    side = ws.peak.side_size
    fns = {"jax": (lambda: route_batch(st, xj, pj, pol).arm.block_until_ready(), True),
           "peak": (ws.peak.fn(side), True, 3)}
    if not in_batch_load:
        A_inv, Bm = np.asarray(st.A_inv), np.asarray(st.B)
        pin, pout = np.asarray(st.price_in), np.asarray(st.price_out)

        def np_call():
            out["numpy"] = numpy_route(A_inv, Bm, pin, pout, x, p, ROUTE_POLICY["cost_weight"], ROUTE_POLICY["alpha"])

        fns["numpy"] = (np_call, False)
        if mab is not None:
            from benchmarks import peers
            x64 = x.astype(np.float64)  # MABWiser's own dtype: no conversion charged to it
            fns["mabwiser"] = (lambda: out.update(mab=peers.mabwiser_predict(mab, x64)), False)
            if (K, d, B) == tuple(suite.center):  # as fed float32 embeddings, its dot products cast
                fns["mabwiser_f32"] = (lambda: peers.mabwiser_predict(mab, x), False)
    t = measure_all(fns, suite)
    ws.peak.record(side, t["peak"][0])
    steady = t["jax"][0]
    gflops = route_flops(K, d, B) / steady / 1e9
    local = 2 * side**3 / t["peak"][0] / 1e9
    row = dict(K=K, d=d, B=B, in_batch_load=in_batch_load, compile_s=compile_s,
               jax_s=steady, jax_decisions_per_s=B / steady, jax_gflops=gflops,
               peak_fraction=gflops / ws.peak.peak, matmul_in_turns_gflops=local,
               peak_fraction_in_turns=gflops / local)
    if "numpy" in t:
        jax_arm = np.asarray(route_batch(st, xj, pj, pol).arm)
        row.update(numpy_decisions_per_s=B / t["numpy"][0], speedup_vs_numpy=t["numpy"][0] / steady,
                   agree_numpy=float(np.mean(out["numpy"] == jax_arm)))
    if "mabwiser" in t:
        row.update(mabwiser_decisions_per_s=B / t["mabwiser"][0], speedup_vs_mabwiser=t["mabwiser"][0] / steady)
        if "mabwiser_f32" in t:
            row.update(mabwiser_f32_decisions_per_s=B / t["mabwiser_f32"][0],
                       speedup_vs_mabwiser_f32=t["mabwiser_f32"][0] / steady)
        if (K, d, B) == tuple(suite.center):
            # MABWiser's LinUCB is route_batch with no cost and no latency term: same arms?
            lin = Policy(cost_weight=0.0, alpha=PEER_ALPHA, beta=0.0, in_batch_load=False)
            row["agree_mabwiser"] = float(np.mean(np.asarray(route_batch(st, xj, pj, lin).arm) == out["mab"]))
    return row


def bench_update(ws: Workspace, K, d, B, hot) -> dict:
    """One update_batch configuration, with numpy and MABWiser one observation at a time beside it."""
    suite = ws.suite
    st, _, mab = ws.state(K, d)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, d)).astype(np.float32) / np.sqrt(d)
    x[:, -1] = 1.0
    y = rng.normal(size=(B, 2)).astype(np.float32)
    arm = np.zeros(B, np.int32) if hot else rng.integers(0, K, B).astype(np.int32)
    xj, aj, yj = map(jnp.asarray, (x, arm, y))
    n_np = min(B, suite.numpy_updates)
    A_inv, Bm = np.array(st.A_inv), np.array(st.B)
    compile_s = aot_compile_time(bandit.update_batch, st, xj, aj, yj, seen=ws.compiled,
                                 key=("update_batch", K, d, B))
    fns = {"jax": (lambda: bandit.update_batch(st, xj, aj, yj).A_inv.block_until_ready(), True),
           "numpy": (lambda: numpy_update(A_inv, Bm, x[:n_np], arm[:n_np], y[:n_np]), False)}
    n_pf = min(B, suite.peer_updates)
    if mab is not None:
        from benchmarks import peers
        x64 = x[:n_pf].astype(np.float64)
        fns["mabwiser"] = (lambda: peers.mabwiser_partial_fit_each(mab, x64, arm[:n_pf], y[:n_pf, 0]), False)
    t = measure_all(fns, suite)
    steady = t["jax"][0]
    row = dict(K=K, d=d, B=B, hot_arm=hot, compile_s=compile_s, jax_s=steady,
               jax_updates_per_s=B / steady, numpy_updates_per_s=n_np / t["numpy"][0],
               speedup_vs_numpy=(t["numpy"][0] / n_np) / (steady / B))
    if "mabwiser" in t:
        row.update(mabwiser_updates_per_s=n_pf / t["mabwiser"][0],
                   speedup_vs_mabwiser=(t["mabwiser"][0] / n_pf) / (steady / B))
    return row


# ---- text to decision --------------------------------------------------------------------------

def text_setup(ws: Workspace) -> dict:
    """Load RouterBench and the encoder, train a Router (no head) and the peers on the same queries.

    Returns {} with "skipped" set when the data or the encoder is not here.
    """
    from mixllm_jax import data as data_mod
    from mixllm_jax.text import encoder as enc_mod
    from mixllm_jax.core.config import Budget, RouterConfig
    from mixllm_jax.offline.train import train_router

    suite = ws.suite
    try:
        ds = data_mod.load_routerbench(split="train")
    except (FileNotFoundError, OSError) as e:
        return {"skipped": f"RouterBench data not found ({e})"}
    try:
        enc = enc_mod.load_encoder()
    except enc_mod.EncoderNotFoundError as e:
        return {"skipped": f"encoder not found ({str(e).splitlines()[0]})"}
    # The longest prompts (every one fills the largest max_length) are routed; others train.
    n_tok = np.array([len(t) for t in enc.encode_ids(ds.prompts, max_length=enc.config.max_position_embeddings)])
    order = np.argsort(-n_tok, kind="stable")
    route_rows = order[: suite.text_batch]
    rest = np.random.default_rng(0).permutation(order[suite.text_batch:])
    train = ds.select(np.sort(rest[: suite.text_train]))
    t0 = time.perf_counter()
    e = enc.embed(train.prompts, batch_size=64, max_length=64)  # not a shape timed below
    # speed is measured, not quality: the ridge by evidence, no cross-fitting (folds=0)
    cfg = RouterConfig(head=None, features="raw", budget=Budget("cost_weight", 0.0), ridge_selection="evidence", folds=0)
    router = train_router(train, ds.specs, enc, cfg,
                          embeddings=e,
                          progress=False)
    ws.log(f"text: Router trained on {len(train)} RouterBench queries (no head, d={router.state.dim}, "
           f"{len(ds.models)} LLMs) in {time.perf_counter() - t0:.1f} s")
    router = _bench_router(router)
    setup = {"router": router, "encoder": enc, "texts": [ds.prompts[i] for i in route_rows],
             "full_tokens": n_tok[route_rows], "n_train": len(train), "n_llms": len(ds.models),
             "encoder_name": enc.identity["name"]}
    static = ws.static_dir()
    if static is not None:
        t0 = time.perf_counter()
        senc = enc_mod.load_encoder(f"static:{static}")
        es = senc.embed(train.prompts, batch_size=64, max_length=64)
        srouter = train_router(train, ds.specs, senc, cfg, embeddings=es, progress=False)
        setup.update(static_router=_bench_router(srouter), static_encoder=senc,
                     static_name=senc.identity["name"], static_dims=senc.hidden_size)
        ws.log(f"text: static tier {senc.identity['name']} ({senc.hidden_size} dims), Router trained in "
               f"{time.perf_counter() - t0:.1f} s")
    if ws.has("mabwiser") or ws.has("sentence-transformers"):
        from benchmarks import peers
        if ws.has("mabwiser"):
            rows, cols = np.nonzero(np.isfinite(train.quality))
            ctx = np.hstack([e, np.ones((len(e), 1), np.float32)])[rows]  # the Router's features
            setup["mab"] = peers.mabwiser_linucb(ctx, cols, train.quality[rows, cols], len(ds.models),
                                                 PEER_ALPHA, float(router.state.ridge[0]))
        if ws.has("sentence-transformers"):
            import transformers
            transformers.utils.logging.disable_progress_bar()  # its weight-loading bar
            try:
                setup["st"] = peers.sentence_transformer(enc.identity["path"])
            finally:
                transformers.utils.logging.enable_progress_bar()
    return setup


def _bench_router(router):
    """The timed Router: sentence-transformers' truncation side (both encode the same tokens), and
    a pure LinUCB policy as MABWiser's."""
    return dataclasses.replace(router, config=dataclasses.replace(router.config, truncation_side="right"),
                               policy=Policy(cost_weight=0.0, alpha=PEER_ALPHA, beta=0.0, in_batch_load=False))


def bench_text(ws: Workspace, setup: dict, L: int) -> dict:
    """Texts to decisions at max_length L: the fused Router, encoding alone, and the peers."""
    from benchmarks import peers

    suite = ws.suite
    texts = setup["texts"]
    n = len(texts)
    at_length = lambda r: dataclasses.replace(r, config=dataclasses.replace(r.config, max_length=L))
    router = at_length(setup["router"])
    enc = setup["encoder"]
    out = {}

    def fused():
        d, _, _ = router.decide(texts)
        out["arm"] = np.asarray(d.arm.block_until_ready())[:n]

    fns = {"jax": (fused, True),
           "encode": (lambda: enc.embed(texts, batch_size=n, max_length=L, truncation_side="right"), True)}
    if "static_router" in setup:
        srouter = at_length(setup["static_router"])
        senc = setup["static_encoder"]

        def static_fused():
            d, _, _ = srouter.decide(texts)
            out["static_arm"] = np.asarray(d.arm.block_until_ready())[:n]

        fns["static"] = (static_fused, True)
        fns["static_encode"] = (lambda: senc.embed(texts, batch_size=n, max_length=L, truncation_side="right"), True)
    if "st" in setup:
        fns["st"] = (lambda: peers.st_encode(setup["st"], texts, L, n), False)
        if "mab" in setup:
            def peer():
                e = peers.st_encode(setup["st"], texts, L, n)
                out["peer"] = peers.mabwiser_predict(setup["mab"], np.hstack([e, np.ones((n, 1), e.dtype)]))

            fns["peer"] = (peer, False)
    t = measure_all(fns, suite)
    (steady, first), (enc_s, enc_first) = t["jax"], t["encode"]
    tokens = float(np.minimum(setup["full_tokens"], L).mean())
    gflop = n * encoder_flops(int(round(tokens)), enc.hidden_size, enc.config.num_hidden_layers,
                              enc.config.intermediate_size) / 1e9
    row = dict(max_length=L, texts=n, tokens_per_text=tokens, compile_s=compile_time(first, steady),
               jax_s=steady, jax_texts_per_s=n / steady, encode_compile_s=compile_time(enc_first, enc_s),
               encode_texts_per_s=n / enc_s, encode_gflops=gflop / enc_s)  # encode_peak_fraction: at the end
    if "static" in t:
        (s_steady, s_first), (se_s, se_first) = t["static"], t["static_encode"]
        row.update(static_s=s_steady, static_texts_per_s=n / s_steady, static_compile_s=compile_time(s_first, s_steady),
                   static_encode_texts_per_s=n / se_s, static_vs_jax=steady / s_steady,
                   static_agree_jax=float(np.mean(out["static_arm"] == out["arm"])))
    if "st" in t:
        row.update(st_encode_texts_per_s=n / t["st"][0], encode_vs_st=t["st"][0] / enc_s)
    if "peer" in t:
        row.update(peer_texts_per_s=n / t["peer"][0], speedup_vs_peer=t["peer"][0] / steady,
                   agree_peer=float(np.mean(out["arm"] == out["peer"])))
        if "static" in t:
            row["static_speedup_vs_peer"] = t["peer"][0] / t["static"][0]
    return row


# ---- HTTP: the router service on the static tier -----------------------------------------------

def bench_http(ws: Workspace, out: Path, levels=HTTP_LEVELS, requests: int = 2048, duration_s: float = 10.0) -> dict:
    """/v1/route on loopback (benchmarks/loadgen.py in a child process: the server, the stub backend
    and the load generator on this machine) with a small router on the static tier, max_length 128.
    Returns loadgen's report (its http rows), or {"skipped": why}."""
    import subprocess

    static = ws.static_dir()
    if static is None:
        return {"skipped": "--no-static"}
    folder = out / "loadgen-static"
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--encoder", f"static:{static}", "--max-length", "128",
           "--concurrency", ",".join(map(str, levels)), "--requests", str(requests), "--duration-s", str(duration_s),
           "--max-batch", "64", "--skip-proxy", "--offline-batches", "64", "--offline-min-s", "1",
           "--out", str(folder)]
    ws.log("http: " + " ".join(cmd[1:]))
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"loadgen failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"}
    report = json.loads((folder / "loadgen.json").read_text())
    return {"command": "python " + " ".join(cmd[1:]), "router": report["router"], "max_batch": report["max_batch"],
            "route": report["http"]["/v1/route"], "offline": report["offline"]}


# ---- targets -----------------------------------------------------------------------------------

def targets(results: dict) -> list[dict]:
    """The issue's acceptance targets, each met / missed / not measured with the measured figure."""
    K0, d0, B0 = results["suite"]["center"]
    route = [r for r in results["route"] if not r["in_batch_load"]]
    center = next((r for r in route if (r["K"], r["d"], r["B"]) == (K0, d0, B0)), None)
    big_B = max((r for r in route if (r["K"], r["d"]) == (K0, d0)), key=lambda r: r["B"], default=None)
    upd = next((r for r in results["update"] if (r["K"], r["d"], r["B"], r["hot_arm"]) == (K0, d0, B0, False)),
               None) or next((r for r in results["update"] if not r["hot_arm"]), None)
    text = [r for r in results.get("text", []) if "speedup_vs_peer" in r]
    peers = results["peers"]

    def item(name, goal, value, unit, why_missing, where, at_most=False):
        if value is None:
            return dict(target=name, goal=goal, measured=None, unit=unit, at_most=at_most, status="not measured",
                        why=why_missing, where=where)
        met = value <= goal if at_most else value >= goal
        return dict(target=name, goal=goal, measured=value, unit=unit, at_most=at_most,
                    status="met" if met else "missed", where=where)

    mab_why = peers["mabwiser"]["skipped"]
    frac = None
    if big_B:
        frac = dict(big_B, peak_fraction=big_B["peak_fraction_in_turns"]) if "peak_fraction_in_turns" in big_B \
            else big_B
    out = [
        item("route_batch vs MABWiser predict", TARGETS["route_vs_mabwiser"],
             center and center.get("speedup_vs_mabwiser"), "x", mab_why,
             f"K={K0} d={d0} B={B0}, contexts float64" + (
                 f" ({center['speedup_vs_mabwiser_f32']:.2f}x when fed float32)"
                 if center and "speedup_vs_mabwiser_f32" in center else "")),
        item("update_batch vs MABWiser partial_fit one at a time", TARGETS["update_vs_mabwiser"],
             upd and upd.get("speedup_vs_mabwiser"), "x", mab_why,
             upd and f"K={upd['K']} d={upd['d']} B={upd['B']}, spread over arms"),
        item("route_batch fraction of matmul peak at large B", TARGETS["route_peak_fraction"],
             frac and frac["peak_fraction"], "of peak", "no route rows",
             big_B and f"K={K0} d={d0} B={big_B['B']}: {big_B['jax_gflops']:.1f} GFLOP/s vs the matmul "
                       f"sampled in turns with it ({big_B.get('matmul_in_turns_gflops', 0):.1f}); "
                       f"{100 * big_B['peak_fraction']:.0f}% of the run's best matmul "
                       f"({results['matmul']['peak_gflops']:.1f})"),
    ]
    if text:
        worst = min(text, key=lambda r: r["speedup_vs_peer"])
        per = ", ".join(f"L={r['max_length']}: {r['speedup_vs_peer']:.2f}x" for r in text)
        out.append(item("text to decision vs sentence-transformers + MABWiser", TARGETS["text_vs_peer"],
                        worst["speedup_vs_peer"], "x (lowest over lengths)", None, per))
    else:
        why = results.get("text_skipped") or peers["sentence-transformers"]["skipped"] or mab_why
        out.append(item("text to decision vs sentence-transformers + MABWiser", TARGETS["text_vs_peer"],
                        None, "x", why, "-"))
    static = next((r for r in text if r["max_length"] == STATIC_TARGET_LENGTH and "static_speedup_vs_peer" in r), None)
    why = results.get("text_skipped") or results.get("static_skipped") or peers["sentence-transformers"]["skipped"] \
        or mab_why or f"no max_length {STATIC_TARGET_LENGTH} row"
    out.append(item("static tier: text to decision vs sentence-transformers + MABWiser", TARGETS["static_text_vs_peer"],
                    static and static["static_speedup_vs_peer"], "x", why,
                    static and f"L={STATIC_TARGET_LENGTH}: {static['static_texts_per_s']:,.0f} texts/s vs "
                               f"{static['peer_texts_per_s']:,.1f}; {static['static_vs_jax']:.0f}x the MiniLM Router"))
    http = results.get("http_static") or {}
    rows = {r["concurrency"]: r for r in http.get("route", [])}
    why = http.get("skipped") or "not run (--http)"
    c64, c1 = rows.get(64), rows.get(1)
    out.append(item("static tier: /v1/route requests/s at concurrency 64", TARGETS["http_static_rps_c64"],
                    c64 and c64["rps"], " req/s", why,
                    c64 and f"p50 {c64['p50_ms']} ms, p99 {c64['p99_ms']} ms, mean batch "
                            f"{c64['mean_batch'] and round(c64['mean_batch'], 1)}"))
    out.append(item("static tier: /v1/route p50 latency at concurrency 1", TARGETS["http_static_p50_ms_c1"],
                    c1 and c1["p50_ms"], " ms", why, c1 and f"{c1['rps']} req/s, p99 {c1['p99_ms']} ms",
                    at_most=True))
    return out


# ---- driver ------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> list[str] | None:
    """numpy's BLAS as threadpoolctl reports it (kernel and threads), when it is installed."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} x{i.get('num_threads')} "
            f"({i.get('prefix')})" for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def route_configs(suite: Suite) -> list[tuple]:
    """(K, d, B) of the three sweeps, each once, center first."""
    K0, d0, B0 = suite.center
    cfgs = [suite.center] + [(K0, d0, b) for b in suite.route_B] + [(k, d0, B0) for k in suite.route_K] + \
        [(K0, d, B0) for d in suite.route_d]
    return list(dict.fromkeys(cfgs))


def run(suite: Suite = FULL, *, peers_on: bool = True, text_on: bool = True, progress: bool = True,
        argv: list[str] | None = None, static: str | None = "auto", http: bool = False,
        out: Path | None = None) -> dict:
    """Run the suite; returns the results dict (see results.json). static: the static encoder folder
    ("auto": distilled into the cache directory; None: no static tier); http: also run the service
    on the static tier (loadgen, its files under `out`)."""
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    ws = Workspace(suite, peers_on, text_on, progress, static if text_on or http else None)
    results = {
        "device": f"{dev.platform}:{dev.device_kind}",
        "jax_backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "command": "python -m benchmarks.throughput " + " ".join(argv or []),
        "load_average_start": _load(),
        "numpy_blas": _blas(),
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "OMP_NUM_THREADS",
                                           "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS") if k in os.environ},
        "suite": dataclasses.asdict(suite),
        "route_policy": dict(ROUTE_POLICY, peer_alpha=PEER_ALPHA),
        "peers": ws.peers,
        "compile_note": "route_batch, update_batch: jit(...).lower(...).compile() time; Router.decide, "
                        "Encoder.embed: first call minus a steady call (tracing + XLA compilation)",
    }
    for name, p in ws.peers.items():
        if p["version"] is None:
            ws.log(f"peer {name}: skipped ({p['skipped']})")
        else:
            ws.log(f"peer {name}: {p['version']}")
    cfgs = route_configs(suite)
    upd_cfgs = [(B, hot) for B in suite.update_B for hot in (False, True)]
    n_steps = 2 + len(cfgs) + 1 + len(upd_cfgs) + (1 + len(suite.text_lengths) if text_on else 0) + int(http)
    if progress:
        from tqdm.auto import tqdm
        ws._bar = tqdm(total=n_steps, desc="bench", unit="cfg", file=sys.stderr)
    try:
        ws.log(f"device {results['device']} ({results['cpu']}, {results['cpu_count']} cores), "
               f"load average {results['load_average_start']}")
        ws.peak.measure_sizes()
        ws.log(f"matmul peak: {ws.peak.peak:.1f} GFLOP/s float32 "
               f"({', '.join(f'n={n}: {g:.1f}' for n, g in ws.peak.gflops.items())})")
        ws.step("matmul peak")

        results["route"] = []
        for K, d, B in cfgs:
            r = bench_route(ws, K, d, B)
            results["route"].append(r)
            ws.log(_route_line(r))
            ws.step(f"route K={K} d={d} B={B}")
        K0, d0, B0 = suite.center
        r = bench_route(ws, K0, d0, B0, in_batch_load=True)
        results["route"].append(r)
        ws.log(_route_line(r))
        ws.step("route in_batch_load")

        results["update"] = []
        for B, hot in upd_cfgs:
            r = bench_update(ws, K0, d0, B, hot)
            results["update"].append(r)
            ws.log(_update_line(r))
            ws.step(f"update B={B} hot={hot}")

        results["text"] = []
        if text_on:
            setup = text_setup(ws)
            ws.step("text setup")
            if "skipped" in setup:
                results["text_skipped"] = setup["skipped"]
                ws.log(f"text: skipped ({setup['skipped']})")
            else:
                results["text_setup"] = {k: setup[k] for k in ("n_train", "n_llms", "encoder_name", "static_name",
                                                                "static_dims") if k in setup}
                if "static_router" not in setup:
                    results["static_skipped"] = "--no-static"
                for L in suite.text_lengths:
                    r = bench_text(ws, setup, L)
                    results["text"].append(r)
                    ws.log(_text_line(r))
                    ws.step(f"text L={L}")
        else:
            results["text_skipped"] = "--no-text"

        if http:
            results["http_static"] = bench_http(ws, Path(out or "runs/bench"))
            ws.log(_http_line(results["http_static"]))
            ws.step("http static")

        # The peak again at the end (a shared machine's load varies): the run's best sample counts.
        ws.peak.measure_sizes()
        ws.log(f"matmul peak, best sample of the run: {ws.peak.peak:.1f} GFLOP/s")
        ws.step("matmul peak again")
    finally:
        if ws._bar is not None:
            ws._bar.close()
        ws.peak.release()
    results["matmul"] = ws.peak.to_dict()
    for r in results["route"]:
        r["peak_fraction"] = r["jax_gflops"] / ws.peak.peak
    for r in results["text"]:
        r["encode_peak_fraction"] = r["encode_gflops"] / ws.peak.peak
    results["targets"] = targets(results)
    results["load_average_end"] = _load()
    results["wall_s"] = time.perf_counter() - t_start
    return results


def _ratio(r, key, label):
    return f", {label} {r[key]:.1f}x" if key in r else ""


def _route_line(r):
    s = (f"route_batch K={r['K']} d={r['d']} B={r['B']}{' in_batch_load' if r['in_batch_load'] else ''}: "
         f"{r['jax_decisions_per_s']:,.0f}/s, {r['jax_gflops']:.1f} GFLOP/s = "
         f"{100 * r['peak_fraction_in_turns']:.0f}% of a matmul sampled in turns")
    if "numpy_decisions_per_s" in r:
        s += f"; numpy {r['numpy_decisions_per_s']:,.0f}/s ({r['speedup_vs_numpy']:.1f}x)"
    if "mabwiser_decisions_per_s" in r:
        s += f"; MABWiser {r['mabwiser_decisions_per_s']:,.0f}/s ({r['speedup_vs_mabwiser']:.1f}x)"
    return s + _compile(r)


def _compile(r):
    return "; compiled for an earlier row" if r["compile_s"] is None else f"; compile {r['compile_s']:.2f} s"


def _update_line(r):
    s = (f"update_batch K={r['K']} d={r['d']} B={r['B']} {'hot arm' if r['hot_arm'] else 'spread'}: "
         f"{r['jax_updates_per_s']:,.0f}/s; numpy one at a time {r['numpy_updates_per_s']:,.0f}/s "
         f"({r['speedup_vs_numpy']:.1f}x)")
    if "mabwiser_updates_per_s" in r:
        s += f"; MABWiser partial_fit {r['mabwiser_updates_per_s']:,.1f}/s ({r['speedup_vs_mabwiser']:.0f}x)"
    return s + _compile(r)


def _http_line(h):
    if "skipped" in h:
        return f"http static tier: skipped ({h['skipped']})"
    return "http static tier /v1/route: " + "; ".join(
        f"c={r['concurrency']}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms" for r in h["route"])


def _text_line(r):
    s = (f"text max_length={r['max_length']} ({r['texts']} texts): Router.decide {r['jax_texts_per_s']:,.1f}/s, "
         f"encode alone {r['encode_texts_per_s']:,.1f}/s ({r['encode_gflops']:.1f} GFLOP/s)")
    if "static_texts_per_s" in r:
        s += (f"; static tier Router.decide {r['static_texts_per_s']:,.0f}/s ({r['static_vs_jax']:.0f}x"
              + (f", {r['static_speedup_vs_peer']:.0f}x the peer" if "static_speedup_vs_peer" in r else "") + ")")
    if "peer_texts_per_s" in r:
        s += f"; sentence-transformers+MABWiser {r['peer_texts_per_s']:,.1f}/s ({r['speedup_vs_peer']:.2f}x)"
    if "st_encode_texts_per_s" in r:
        s += f"; sentence-transformers encode {r['st_encode_texts_per_s']:,.1f}/s ({r['encode_vs_st']:.2f}x)"
    return s + f"; compile {r['compile_s']:.1f} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few configurations (under a minute on 2 cores)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    ap.add_argument("--no-peers", action="store_true", help="skip MABWiser and sentence-transformers")
    ap.add_argument("--no-text", action="store_true", help="skip text to decision (no encoder or data needed)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--static", default="auto",
                    help="static encoder folder for the static tier (default: distilled into the cache directory "
                         "on first use)")
    ap.add_argument("--no-static", action="store_true", help="skip the static tier")
    ap.add_argument("--http", action="store_true",
                    help="also measure /v1/route end to end on the static tier (loadgen, concurrency 1 and 64)")
    args = ap.parse_args(argv)
    from benchmarks import report

    raw = list(sys.argv[1:] if argv is None else argv)
    results = run(QUICK if args.quick else FULL, peers_on=not args.no_peers, text_on=not args.no_text,
                  progress=not args.no_progress, argv=raw, static=None if args.no_static else args.static,
                  http=args.http, out=args.out)
    md = report.write(results, args.out)
    print()
    print(report.targets_table(results))
    print(f"\nwrote {', '.join(str(args.out / f) for f in md)} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

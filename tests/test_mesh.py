"""Sharded compute (mixllm_jax.offline.mesh, mixllm_jax.offline.distributed) on forced CPU host devices.

The checks run in child processes (tests/mesh_child.py, several checks per process) with
XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu, since the device count is
fixed when jax starts. Sizes are tiny; the children are bounded by timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks.loadgen import free_port
from test_encoder import encoder_and_routerbench_ready

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "mesh_child.py"


def child_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", TRANSFORMERS_VERBOSITY="error",
               # N host devices already run at once: BLAS/LAPACK threads on top oversubscribe the
               # cores (a 16 x 384^2 eigh took 50 s instead of 0.7 s on a loaded 2-core machine)
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MIXLLM_COMPILATION_CACHE="off")  # the CLI keeps the tests' compilation cache (conftest)
    return env


def cheap_compile(env: dict) -> dict:
    """LLVM's cheap passes only: the sharded checks are tiny shapes, nearly all compile time (a third
    less of it this way), sharded and unsharded compiled alike."""
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return env


def run_together(cmds: list[list[str]], env: dict, timeout: float, cwd=None) -> list[subprocess.CompletedProcess]:
    """Start the processes of one jax.distributed run; if one fails, stop the others (they would
    wait for it until the coordination service's timeouts)."""
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for c, p in zip(cmds, procs):
        text = p.communicate()[0]
        out.append(subprocess.CompletedProcess(c, p.returncode, text, ""))
    bad = [o for o in out if o.returncode != 0]
    assert not bad, "\n\n".join(f"{o.args}: rc {o.returncode}\n{_tail(o.stdout)}" for o in out)
    return out


def _tail(text: str, n: int = 4000) -> str:
    lines = [l for l in text.splitlines() if not l.startswith(("[Gloo]", "    @"))]
    return "\n".join(lines)[-n:]


def _write_logs(out: Path) -> None:
    """A small RouterBench train log (12 queries per task), a test log and a tiny random BERT for
    the CLI checks (hidden 32: the checks are of the plumbing, the numbers are checked above)."""
    from mixllm_jax import data
    from test_encoder import tiny_bert_folder

    tiny_bert_folder(out / "tiny-bert")

    ds = data.load_routerbench(split="train")
    idx = np.concatenate([np.flatnonzero([t == (task,) for t in ds.tags])[:12]
                          for task in sorted({t[0] for t in ds.tags})])
    data.write_jsonl(ds.select(idx), out / "train.jsonl")
    test = data.load_routerbench(split="test")
    data.write_jsonl(test.select(np.arange(0, len(test), max(1, len(test) // 40))), out / "test.jsonl")


@pytest.mark.slow
def test_sharded_compute_equals_unsharded(tmp_path):
    """Two runs on forced host devices (their checks in tests/mesh_child.py):

    4 devices, one process: route_batch batch-parallel (4x1), arm-parallel (1x4) and both (2x2),
    with and without the in-batch load and a bonus, greedy/UCB and, with the same key, Thompson and
    softmax/epsilon: same arms, scores, propensities and booked load, no recompiles; updates (Woodbury
    per arm block, psum'ed statistics) equal bandit.update_batch and the closed form; mesh.arm_stats
    equals fit.arm_stats and train_router on it gives the unsharded router; the fused text path and
    the sharded encoder; `python -m benchmarks.mesh --quick`; and `mixllm-jax train/eval --devices 2
    --arm-shards 2` beside plain ones.
    2 processes (jax.distributed on 127.0.0.1, 2 devices each): each embeds its share of the log
    and sums its share's arm statistics; the router is the same on both, equals one process's and
    the closed form, and the collective checkpoint restores it; then `train`/`eval --coordinator`.
    """
    cli = encoder_and_routerbench_ready()
    env = cheap_compile(child_env(4))
    if cli:
        _write_logs(tmp_path)
    env["MIXLLM_CACHE"] = str(tmp_path / "cache")
    p = subprocess.run([sys.executable, str(CHILD), "route", "update", "text", "bench", str(tmp_path)]
                       + (["cli", str(tmp_path)] if cli else []), env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "ok bench" in p.stdout and (not cli or "ok cli" in p.stdout), \
        f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    # python -m benchmarks.mesh --quick: every sharded layout decides what one device decides
    res = json.loads((tmp_path / "bench" / "mesh.json").read_text())
    sharded = [r for r in res["route"] if r["layout"] != "1 device"]
    assert {r["layout"] for r in sharded} == {"4x1", "1x4", "2x2"}
    assert all(r["same_arms"] == 1.0 and r["inf_pattern_equal"] and r["decisions_per_s"] > 0 for r in sharded)
    upd = [r for r in res["update"] if r["layout"] != "1 device"]
    assert {r["layout"] for r in upd} == {"4x1 woodbury", "4x1 stats", "1x4 woodbury", "1x4 stats"}
    assert all(r["max_theta_diff"] < 1e-4 for r in upd)
    assert "| 2x2 |" in (tmp_path / "bench" / "mesh.md").read_text()

    port = free_port()
    env = cheap_compile(child_env(2))
    env["MIXLLM_CACHE"] = str(tmp_path / "cache-procs")  # each process embeds its own half afresh
    run = lambda i: ["dist", i, 2, port, tmp_path] + (["cli-procs", i, 2, port, tmp_path] if cli else [])  # noqa: E731
    outs = run_together([[sys.executable, str(CHILD), *map(str, run(i))] for i in range(2)], env, timeout=600)
    assert all("ok dist" in o.stdout for o in outs)
    p0, p1 = np.load(tmp_path / "state-2-0.npz"), np.load(tmp_path / "state-2-1.npz")
    for f in ("A", "A_inv", "B", "count", "noise", "cost_weight", "mix"):
        np.testing.assert_array_equal(p0[f], p1[f])  # the same sum on every process
    if not cli:
        return
    from mixllm_jax.core import bandit
    from mixllm_jax.store import checkpoint

    points = lambda d: json.loads((tmp_path / d / "report.json").read_text())["methods"]["mixllm"]["points"]  # noqa: E731
    assert points("eval-dev") == points("eval-one")
    assert points("eval-procs") == points("eval-one")
    one = checkpoint.restore_router(tmp_path / "one", encoder=None)[0]
    for name in ("dev", "procs"):
        other = checkpoint.restore_router(tmp_path / name, encoder=None)[0]
        assert other.registry.slots == one.registry.slots
        np.testing.assert_array_equal(np.asarray(other.state.count), np.asarray(one.state.count))
        np.testing.assert_allclose(np.asarray(other.state.A), np.asarray(one.state.A), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(bandit.theta(other.state)), np.asarray(bandit.theta(one.state)),
                                   rtol=1e-3, atol=2e-4)
        assert other.policy.cost_weight == pytest.approx(one.policy.cost_weight, rel=1e-4)


# ---- the command line ---------------------------------------------------------------------------

def test_cli_sharding_options_are_checked(capsys):
    from mixllm_jax import cli
    from mixllm_jax.offline import distributed

    for argv, msg in ((["--coordinator", "127.0.0.1:1"], "go together"),
                      (["--arm-shards", "2"], "needs --devices"),
                      (["--devices", "0"], "--devices must be >= 1")):
        with pytest.raises(SystemExit, match=msg):
            distributed.from_args(_parse(["train", *argv]))
    with pytest.raises(SystemExit, match="coordinator must be HOST:PORT"):
        distributed.from_args(_parse(["eval", "--router", "x", "--coordinator", "nohost",
                                      "--num-processes", "2", "--process-id", "0"]))
    with pytest.raises(SystemExit, match="process_id must be in"):
        distributed.from_args(_parse(["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                                      "--process-id", "2"]))
    par = distributed.from_args(_parse(["train"]))
    from mixllm_jax.core.config import RouterConfig

    assert not par.active and par.writer and par.train_kwargs(None, None, RouterConfig()) == {}
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--devices", "--arm-shards", "--coordinator", "--num-processes", "--process-id"):
        assert opt in out


def _parse(argv):
    """The parsed options of a command, without running it."""
    from mixllm_jax import cli

    captured = {}

    def grab(args):
        captured["args"] = args

    import unittest.mock as mock
    with mock.patch.object(cli, "cmd_train", grab), mock.patch.object(cli, "cmd_eval", grab):
        # set_defaults(fn=...) binds the functions when the parser is built, inside main()
        cli.main(argv)
    return captured["args"]


# ---- the benchmarks -----------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path):
    """benchmarks/gpu.sh --smoke with JAX_PLATFORMS=cpu: every section runs and the report names the device."""
    env = child_env(1)
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "copied"),  # and the tests' compilation cache:
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path / "out")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu-cpu.json").read_text())
    assert res["platform"] == "cpu" and not res.get("errors") and not res["skipped"]
    assert {r["B"] for r in res["route"]} == {1, 64}
    assert all(r["decisions_per_s"] > 0 and r["compile_s"] >= 0 for r in res["route"])
    assert all(r.get("agree_numpy", 1.0) == 1.0 for r in res["route"])
    assert res["text"] and res["text"][0]["texts_per_s"] > 0 and len(res["update"]) == 2
    md = (tmp_path / "out" / "gpu-cpu.md").read_text()
    assert "# mixllm-jax on cpu" in md and "## Text to decision" in md and "matmul peak" in md
    assert (tmp_path / "copied" / "gpu-cpu.md").read_text() == md  # $OUT gets a copy


def test_devices_option_makes_cpu_host_devices():
    """--devices N on a CPU with no XLA_FLAGS: N host devices and a mesh."""
    env = {k: v for k, v in child_env(1).items() if k != "XLA_FLAGS"}
    code = ("import argparse, jax; from mixllm_jax.offline import distributed as D; "
            "a = argparse.Namespace(devices=3, arm_shards=3, coordinator=None, num_processes=None, process_id=None); "
            "p = D.from_args(a); print(len(jax.devices()), dict(p.mesh.shape))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3 {'batch': 1, 'arms': 3}"

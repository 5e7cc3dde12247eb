"""Sharded compute (mixllm_jax.mesh, mixllm_jax.distributed) on forced CPU host devices.

Each check runs in a child process (tests/mesh_child.py) with
XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu, since the device count is
fixed when jax starts. Sizes are tiny; the children are bounded by timeouts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "mesh_child.py"


def child_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", TRANSFORMERS_VERBOSITY="error",
               # N host devices already run at once: BLAS/LAPACK threads on top oversubscribe the
               # cores (a 16 x 384^2 eigh took 50 s instead of 0.7 s on a loaded 2-core machine)
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


def run_child(check: str, *args, devices: int = 4, timeout: float = 420) -> str:
    p = subprocess.run([sys.executable, str(CHILD), check, *map(str, args)], env=child_env(devices),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 and f"ok {check}" in p.stdout, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_decisions_equal_unsharded():
    """route_batch batch-parallel (4x1), arm-parallel (1x4) and both (2x2), with and without the
    in-batch load and a bonus: same arms, scores (float32), propensities and booked load; Thompson
    and softmax/epsilon policies with the same key draw the same; no recompiles."""
    run_child("route")


@pytest.mark.slow
def test_sharded_updates_and_training_equal_unsharded_and_closed_form():
    """Statistics reduced over the batch shards and applied exactly: equal to bandit.update_batch
    (Woodbury) and to the numpy closed-form ridge; mesh.arm_stats equals fit.arm_stats and
    train_router on them gives the unsharded router (state, evidence ridge, calibrated policy)."""
    run_child("update")


@pytest.mark.slow
def test_sharded_text_to_decision_equals_unsharded():
    """The fused encoder -> head -> decision path on the mesh (every feature mode) and the encoder
    with its batches split over the devices."""
    run_child("text")


@pytest.mark.slow
def test_two_processes_train_the_same_router_as_one(tmp_path):
    """jax.distributed on 127.0.0.1: each process embeds its share and sums its share's arm
    statistics (2 local devices each, arm-parallel); train_router on the merged statistics gives the
    same state and policy on both processes, equal to one process's and to the closed form, and the
    collective checkpoint restores it."""
    run_child("dist", 0, 1, 0, tmp_path, devices=2)
    port = free_port()
    cmds = [[sys.executable, str(CHILD), "dist", str(i), "2", str(port), str(tmp_path)] for i in range(2)]
    outs = run_together(cmds, child_env(2), timeout=180)
    assert all("ok dist" in o.stdout for o in outs)
    one = np.load(tmp_path / "state-1-0.npz")
    p0, p1 = np.load(tmp_path / "state-2-0.npz"), np.load(tmp_path / "state-2-1.npz")
    for f in ("A", "A_inv", "B", "count", "noise", "cost_weight", "mix"):
        np.testing.assert_array_equal(p0[f], p1[f])  # the same sum on every process
        np.testing.assert_allclose(p0[f], one[f], rtol=1e-5, atol=1e-5 * np.abs(one[f]).max())  # float32 sums
    np.testing.assert_array_equal(p0["count"], one["count"])


# ---- the command line ---------------------------------------------------------------------------

def test_cli_sharding_options_are_checked():
    from mixllm_jax import cli, distributed

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
    from mixllm_jax.config import RouterConfig

    assert not par.active and par.writer and par.train_kwargs(None, None, RouterConfig()) == {}
    out = subprocess.run([sys.executable, "-m", "mixllm_jax.cli", "train", "--help"], capture_output=True,
                         text=True, env=child_env(1)).stdout
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


def _cli_ready():
    from mixllm_jax import data, encoder
    try:
        encoder.resolve_encoder()
    except encoder.EncoderNotFoundError:
        return False
    return (data.routerbench_dir() / "models.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _cli_ready(), reason="needs the default encoder and RouterBench data")
def test_cli_train_on_devices_and_processes_equals_one_device(tmp_path):
    """mixllm-jax train --devices 2 --arm-shards 2, and two processes (--coordinator ...), give the
    router that plain `train` gives (no head, so the features are the embeddings themselves)."""
    from mixllm_jax import bandit, checkpoint, data

    ds = data.load_routerbench(split="train")
    idx = np.concatenate([np.flatnonzero([t == (task,) for t in ds.tags])[:12]
                          for task in sorted({t[0] for t in ds.tags})])
    jsonl = tmp_path / "train.jsonl"
    data.write_jsonl(ds.select(idx), jsonl)
    models = str(data.routerbench_dir() / "models.json")
    env = child_env(2)
    env["MIXLLM_CACHE"] = str(tmp_path / "cache")
    base = [sys.executable, "-m", "mixllm_jax.cli", "train", "--data", str(jsonl), "--models", models,
            "--max-length", "32", "--no-head"]
    subprocess.run(base + ["--out", str(tmp_path / "one")], env=env, check=True, timeout=300, capture_output=True)
    p = subprocess.run(base + ["--out", str(tmp_path / "dev"), "--devices", "2", "--arm-shards", "2"], env=env,
                       timeout=300, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    port = free_port()
    env["MIXLLM_CACHE"] = str(tmp_path / "cache2")  # each process embeds its own half afresh
    run_together([base + ["--out", str(tmp_path / "procs"), "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(i)] for i in range(2)], env, timeout=300)
    # eval: the sweep routed on the mesh, and the test split embedded by two processes
    test = data.load_routerbench(split="test")
    data.write_jsonl(test.select(np.arange(0, len(test), max(1, len(test) // 40))), tmp_path / "test.jsonl")
    ev = [sys.executable, "-m", "mixllm_jax.cli", "eval", "--router", str(tmp_path / "one"), "--data",
          str(tmp_path / "test.jsonl"), "--train-data", str(jsonl), "--models", models, "--no-baselines"]
    subprocess.run(ev + ["--out", str(tmp_path / "eval-one")], env=env, check=True, timeout=300, capture_output=True)
    p = subprocess.run(ev + ["--out", str(tmp_path / "eval-dev"), "--devices", "2"], env=env, timeout=300,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    port = free_port()
    run_together([ev + ["--out", str(tmp_path / "eval-procs"), "--coordinator", f"127.0.0.1:{port}",
                        "--num-processes", "2", "--process-id", str(i)] for i in range(2)], env, timeout=300)
    points = lambda d: json.loads((tmp_path / d / "report.json").read_text())["methods"]["mixllm"]["points"]
    assert points("eval-dev") == points("eval-one")
    assert points("eval-procs") == points("eval-one")

    one = checkpoint.restore_router(tmp_path / "one")[0]
    for name in ("dev", "procs"):
        other = checkpoint.restore_router(tmp_path / name)[0]
        assert other.registry.slots == one.registry.slots
        np.testing.assert_array_equal(np.asarray(other.state.count), np.asarray(one.state.count))
        np.testing.assert_allclose(np.asarray(other.state.A), np.asarray(one.state.A), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(bandit.theta(other.state)), np.asarray(bandit.theta(one.state)),
                                   rtol=1e-3, atol=2e-4)


# ---- the benchmarks -----------------------------------------------------------------------------

@pytest.mark.slow
def test_mesh_benchmark_quick_agrees(tmp_path):
    """python -m benchmarks.mesh --quick: every sharded layout decides what one device decides."""
    env = child_env(4)
    p = subprocess.run([sys.executable, "-m", "benchmarks.mesh", "--quick", "--out", str(tmp_path)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "mesh.json").read_text())
    sharded = [r for r in res["route"] if r["layout"] != "1 device"]
    assert {r["layout"] for r in sharded} == {"4x1", "1x4", "2x2"}
    assert all(r["same_arms"] == 1.0 and r["inf_pattern_equal"] and r["decisions_per_s"] > 0 for r in sharded)
    upd = [r for r in res["update"] if r["layout"] != "1 device"]
    assert {r["layout"] for r in upd} == {"4x1 woodbury", "4x1 stats", "1x4 woodbury", "1x4 stats"}
    assert all(r["max_theta_diff"] < 1e-4 for r in upd)
    assert "| 2x2 |" in (tmp_path / "mesh.md").read_text()


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path):
    """benchmarks/gpu.sh --smoke with JAX_PLATFORMS=cpu: every section runs and the report names the device."""
    env = child_env(1)
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "copied"))
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
    code = ("import argparse, jax; from mixllm_jax import distributed as D; "
            "a = argparse.Namespace(devices=3, arm_shards=3, coordinator=None, num_processes=None, process_id=None); "
            "p = D.from_args(a); print(len(jax.devices()), dict(p.mesh.shape))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3 {'batch': 1, 'arms': 3}"

"""Exit statuses (issue 24, item 7): every command exits 0 on success, 2 on a user error (bad input, a
missing file, a refused option) and 1 on an internal error. train, eval, route and ope run through the
INSTALLED console script (`.venv/bin/mixllm-jax`, as a shell's `train && serve` would), on a small
JSONL log and a tiny random BERT; the statuses themselves are checked on run_command in-process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixllm_jax.util.command import EXIT_INTERNAL, EXIT_USER, run_command

SCRIPT = Path(sys.executable).parent / "mixllm-jax"


# ---- the statuses (in-process, no subprocess) --------------------------------------------------

def _status(fn, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_command(fn)
    return e.value.code, capsys.readouterr().err


def _raise(e):
    def fn():
        raise e
    return fn


def test_user_errors_exit_2_and_internal_errors_exit_1(capsys):
    from mixllm_jax.data.dataset import DataError
    from mixllm_jax.store.checkpoint import CheckpointError

    for e in (ValueError("bad value"), DataError("logs.jsonl", 3, "quality", "not a number"),
              CheckpointError("no checkpoint"),
              FileNotFoundError("no such file"), SystemExit("--devices must be >= 1")):
        code, err = _status(_raise(e), capsys)
        assert code == EXIT_USER == 2 and err.startswith("mixllm-jax: error: ") and len(err.splitlines()) == 1, err
    for e in (TypeError("unsupported operand"), KeyError("slot"), RuntimeError("XLA failed")):
        code, err = _status(_raise(e), capsys)
        assert code == EXIT_INTERNAL == 1 and err.startswith("mixllm-jax: internal error: "), err
        assert type(e).__name__ in err and "--debug" in err and len(err.splitlines()) == 1
    assert run_command(lambda: Path("x")) == Path("x")  # a command's result is returned, not a status
    with pytest.raises(SystemExit) as e:
        run_command(_raise(SystemExit(0)))  # --help and the like keep their own status
    assert e.value.code == 0
    with pytest.raises(TypeError):
        run_command(_raise(TypeError("shown")), debug=True)  # --debug: the traceback


def test_main_returns_0_whatever_a_command_returns(monkeypatch):
    """`sys.exit(main())` is the console script: a command returning a Path (train) or estimates (ope)
    must not become exit status 1."""
    from mixllm_jax import cli

    monkeypatch.setenv("MIXLLM_COMPILATION_CACHE", "off")  # keep the tests' compilation cache
    monkeypatch.setattr(cli, "cmd_route", lambda args: Path("checkpoints/x"))
    assert cli.main(["route", "--router", "x", "hi"]) == 0
    monkeypatch.setattr(cli, "cmd_ope", lambda args: {"ips": {"value": 0.5}})
    assert cli.main(["ope", "--log", "l", "--router", "x"]) == 0


# ---- the installed console script --------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with logs.jsonl (train and test splits: 10 and 4 queries per task of the RouterBench
    slice), models.json and a tiny random BERT (bert/)."""
    import shutil

    from mixllm_jax import data
    from test_encoder import encoder_and_routerbench_ready, tiny_bert_folder

    if not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT} (pip install -e .)")
    if not encoder_and_routerbench_ready():
        pytest.skip("needs the default encoder's tokenizer and the RouterBench slice")
    d = tmp_path_factory.mktemp("exit-status")
    pick = lambda ds, k: ds.select(np.concatenate([np.flatnonzero([t == (x,) for t in ds.tags])[:k]  # noqa: E731
                                                   for x in sorted({t[0] for t in ds.tags})]))
    data.write_jsonl(pick(data.load_routerbench(split="train"), 10), d / "train.jsonl")
    data.write_jsonl(pick(data.load_routerbench(split="test"), 4), d / "test.jsonl")
    (d / "logs.jsonl").write_text((d / "train.jsonl").read_text() + (d / "test.jsonl").read_text())
    shutil.copy(data.routerbench_dir() / "models.json", d / "models.json")
    tiny_bert_folder(d / "bert")
    import jax

    (d / "cache").mkdir()  # the commands' compilation cache ($MIXLLM_CACHE/jax): the tests' own, kept warm
    (d / "cache" / "jax").symlink_to(jax.config.jax_compilation_cache_dir, target_is_directory=True)
    return d


def cli(work: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIXLLM_CACHE": str(work / "cache"), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(SCRIPT), *map(str, argv)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_console_script_exit_status_of_train_eval_route_ope(work):
    data_opts = ["--data", "logs.jsonl", "--models", "models.json"]
    r = cli(work, "train", *data_opts, "--encoder", work / "bert", "--max-length", 32, "--no-head", "--out", "ck")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "router saved to ck" in r.stdout
    r = cli(work, "eval", "--router", "ck", *data_opts, "--no-baselines", "--cost-weights", "0,10,1000",
            "--out", "eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "eval" / "report.json").is_file()
    r = cli(work, "route", "--router", "ck", "What is 2 + 2?")
    assert r.returncode == 0 and "chosen:" in r.stdout, r.stderr[-3000:]

    from mixllm_jax.offline import ope
    from mixllm_jax.store import checkpoint

    router = checkpoint.restore_router(work / "ck")[0]
    rng, n = np.random.default_rng(0), 40
    x = rng.normal(size=(n, router.state.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    names = list(router.registry.slots)
    ope.write_log(work / "decisions.jsonl", x, np.full(n, 50.0), [names[i % len(names)] for i in range(n)],
                  rng.uniform(size=n), np.full(n, 1.0 / len(names)))
    r = cli(work, "ope", "--log", "decisions.jsonl", "--router", "ck", "--out", "ope.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"ips", "snips", "dr"} <= set(json.loads((work / "ope.json").read_text()))

    # user errors: exit 2, one line on stderr
    bad_log = work / "bad.jsonl"
    ope.write_log(bad_log, x[:, :3], np.full(n, 50.0), [names[0]] * n, np.ones(n), np.ones(n))  # wrong dims
    for argv, said in ((["train", "--data", "missing.jsonl", "--models", "models.json"], "missing.jsonl"),
                       (["eval", "--router", "ck", *data_opts, "--reference", "gpt-5"], "--reference 'gpt-5'"),
                       (["route", "--router", "no-such-checkpoint", "hi"], "no checkpoint"),
                       (["ope", "--log", bad_log, "--router", "ck"], "dimensions"),
                       (["train", "--no-such-option"], "unrecognized arguments")):
        r = cli(work, *argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr[-3000:])
        assert said in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr[-3000:])

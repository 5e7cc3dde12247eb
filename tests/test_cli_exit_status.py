"""Exit statuses (issue 24, item 7): every command exits 0 on success, 2 on a user error (bad input, a
missing file, a refused option) and 1 on an internal error, checked here on run_command in-process.
Through the INSTALLED console script (`.venv/bin/mixllm-jax`, as a shell's `train && serve` would):
train, eval, route, ope, simulate and serve exit 0 as the docs run them, and train, eval, route and
ope exit 2 on user errors, in tests/test_examples.py."""
from pathlib import Path

import pytest

from mixllm_jax.util.command import EXIT_INTERNAL, EXIT_USER, run_command



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

"""The command line: help, errors. (train -> eval -> route end to end: test_readme.py, on the README's lines.)"""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from mixllm_jax import cli, data


def subset(split, per_task):
    ds = data.load_routerbench(split=split)
    idx = np.concatenate([np.flatnonzero([t == (task,) for t in ds.tags])[:per_task]
                          for task in sorted({t[0] for t in ds.tags})])
    return ds.select(idx)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    path = d / "logs.jsonl"
    data.write_jsonl(subset("train", 40), d / "train.jsonl")
    data.write_jsonl(subset("test", 20), d / "test.jsonl")
    path.write_text((d / "train.jsonl").read_text() + (d / "test.jsonl").read_text())
    return path


def test_help_explains_every_command_and_option():
    ap = cli.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = subprocess.run([sys.executable, "-m", "mixllm_jax.cli", "--help"], capture_output=True, text=True).stdout
    for name, parser in sub.choices.items():
        assert helps.get(name), f"command {name!r} has no help"
        assert name in out and helps[name].split()[0] in out
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or name == "bench":  # bench forwards its options
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.dest} has no help"


def test_jsonl_without_models_is_a_clear_error(jsonl, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", str(jsonl)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "mixllm-jax: error: --models is required with a JSONL data file"


def test_errors_are_one_line_and_exit_2(tmp_path):
    """Issue 12: a bad input file (or checkpoint, keys file, ...) is one line on stderr and exit 2;
    --debug shows the traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"query_id": "q1", "prompt": "\xff", "model": "x", "quality": 1}\n')
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": [{"name": "x", "price_in_per_mtok": 1, "price_out_per_mtok": 1}]}))
    cmd = [sys.executable, "-m", "mixllm_jax.cli", "train", "--data", str(bad), "--models", str(models),
           "--out", str(tmp_path / "r")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixllm-jax: error: ") and "bad.jsonl:1:" in lines[0], r.stderr
    assert "not UTF-8" in lines[0]
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "DataError" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mixllm_jax.cli", "route", "--router", str(tmp_path / "none"), "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no checkpoint" in r.stderr, r.stderr

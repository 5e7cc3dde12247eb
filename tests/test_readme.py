"""The README's examples run as written: the Python example, and the command line block's train, eval
and route lines (every other line at least parses)."""
import re
import shlex
import shutil
from pathlib import Path

import pytest


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def _cli_block() -> list[str]:
    """The commands of the README's "Command line" block, continuation lines joined, comments cut."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## Command line\n.*?```sh\n(.*?)```", text, re.S).group(1)
    cmds = re.sub(r"\\\n\s*", " ", block).splitlines()
    return [shlex.split(c, comments=True) for c in cmds if c.strip()]


def test_readme_cli_block_parses():
    """Every command of the block (but the NAME|NAME alternatives) is accepted by the parser."""
    from mixllm_jax import cli

    ap = cli.build_parser()
    cmds = _cli_block()
    assert len(cmds) >= 10 and all(c[0] == "mixllm-jax" for c in cmds)
    for argv in cmds:
        if any("|" in a for a in argv) or argv[1] == "bench":
            continue
        args, rest = ap.parse_known_args(argv[1:])
        assert not rest and callable(args.fn), argv


@pytest.mark.slow
def test_readme_cli_examples_run(tmp_path, monkeypatch, capsys):
    """The block's train, eval and route lines run as written on a small logs.jsonl."""
    import numpy as np

    from mixllm_jax import cli, data

    ds = data.load_routerbench(split="train")
    tasks = sorted({t[0] for t in ds.tags})
    pick = lambda d, k: d.select(np.concatenate([np.flatnonzero([t == (x,) for t in d.tags])[:k] for x in tasks]))
    test = data.load_routerbench(split="test")
    data.write_jsonl(pick(ds, 10), tmp_path / "train.jsonl")
    data.write_jsonl(pick(test, 4), tmp_path / "test.jsonl")
    ood = (tmp_path / "test.jsonl").read_text().replace('"split": "test"', '"split": "ood"').replace('"query_id": "', '"query_id": "ood-')
    (tmp_path / "logs.jsonl").write_text((tmp_path / "train.jsonl").read_text() + (tmp_path / "test.jsonl").read_text() + ood)
    shutil.copy(data.routerbench_dir() / "models.json", tmp_path / "models.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIXLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXLLM_COMPILATION_CACHE", "off")  # keep the tests' compilation cache
    ran = []
    for argv in _cli_block():
        if argv[1] in ("train", "eval", "route"):
            cli.main(argv[1:])
            ran.append(argv[1])
    assert ran.count("train") == 1 and ran.count("eval") >= 2 and ran.count("route") == 2
    out = capsys.readouterr().out
    assert "summary" in out and "chosen:" in out
    assert (tmp_path / "runs" / "eval" / "report.json").is_file()

"""The docs' examples run as written: the Python examples of docs/*.md, and the train, eval and route
lines of docs/cli.md's "Commands" (every other line at least parses), in-process on a small part of
the RouterBench slice standing in for examples/logs.jsonl. (The README's own walk-through, and every
command of the docs through the installed console script: test_examples.py.)"""
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_readme_python_example_runs():
    """Every Python block of docs/*.md (the README's one needs a server: test_examples.py)."""
    n = 0
    for doc in sorted(DOCS.glob("*.md")):
        for code in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            exec(compile(code, str(doc), "exec"), {})
            n += 1
    assert n >= 3, "docs/python-api.md, online-learning.md and sharding.md have Python examples"


def _cli_block() -> list[str]:
    """The commands of the sh blocks of docs/cli.md's "Commands", continuation lines joined, comments cut."""
    section = (DOCS / "cli.md").read_text().split("## Commands\n", 1)[1].split("\n## ", 1)[0]
    block = "".join(re.findall(r"```sh\n(.*?)```", section, re.S))
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


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The block's train, eval and route lines, run as written in a folder whose examples/logs.jsonl
    is a small part of the RouterBench slice (train, test and ood splits) and examples/models.json
    RouterBench's: (folder, stdout, stderr, the commands run)."""
    import contextlib
    import io

    import numpy as np

    from mixllm_jax import cli, data

    d = tmp_path_factory.mktemp("readme")
    ds, test = data.load_routerbench(split="train"), data.load_routerbench(split="test")
    tasks = sorted({t[0] for t in ds.tags})
    pick = lambda s, k: s.select(np.concatenate([np.flatnonzero([t == (x,) for t in s.tags])[:k] for x in tasks]))
    data.write_jsonl(pick(ds, 10), d / "train.jsonl")
    data.write_jsonl(pick(test, 4), d / "test.jsonl")
    test_rows = (d / "test.jsonl").read_text()
    ood = test_rows.replace('"split": "test"', '"split": "ood"').replace('"query_id": "', '"query_id": "ood-')
    (d / "examples").mkdir()
    (d / "examples" / "logs.jsonl").write_text((d / "train.jsonl").read_text() + test_rows + ood)
    shutil.copy(data.routerbench_dir() / "models.json", d / "examples" / "models.json")
    mp = pytest.MonkeyPatch()
    mp.chdir(d)
    mp.setenv("MIXLLM_CACHE", str(d / "cache"))
    mp.setenv("MIXLLM_COMPILATION_CACHE", "off")  # keep the tests' compilation cache
    out, err, ran = io.StringIO(), io.StringIO(), []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for argv in _cli_block():
            if argv[1] in ("train", "eval", "route"):
                cli.main(argv[1:])
                ran.append(argv[1])
    yield d, out.getvalue(), err.getvalue(), ran
    mp.undo()


@pytest.mark.slow
def test_readme_cli_examples_run(readme_run):
    d, out, err, ran = readme_run
    assert ran == ["train", "eval", "eval", "eval", "route", "route"]
    assert "chosen:" in out and (d / "runs" / "eval" / "report.json").is_file()
    assert "loading the" not in err and "it/s" not in err  # no progress output when not on a terminal
    assert any(p.name.isdigit() for p in (d / "checkpoints" / "example").iterdir())  # a numbered checkpoint step
    for name in ("mixllm", "oracle", "random_mix", "per_task_best", "knn", "mlp", "ridge", "mixllm@budget"):
        assert f"| {name} |" in out  # the first eval's table, with the baselines
    # runs/eval/report.json: the second eval's (the ood split, no baselines, the default --out)
    report = json.loads((d / "runs" / "eval" / "report.json").read_text())
    assert report["reference"] == "gpt-4-1106-preview" and report["n_queries"] == 12  # 4 queries x 3 tasks
    assert {"mixllm", "mixllm@budget", "gpt-4-1106-preview"} <= set(report["methods"])
    assert "knn" not in report["methods"]
    pts = report["methods"]["mixllm"]["points"]
    assert {"cost_weight", "cost_pct", "quality_pct"} <= set(pts[0])
    # a higher cost weight never makes the router's choices more expensive on average
    assert pts[-1]["cost_pct"] <= pts[0]["cost_pct"]
    assert (d / "runs" / "eval" / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_train_ends_with_a_summary(readme_run):
    _, out, _, _ = readme_run
    assert re.search(r"\n  \d+ domains \(training queries nearest to each\): arc-challenge \(\d+\)", out)
    fit = out.split("fit on the training log (in-sample):")[1].split("budget:")[0]
    assert "quality RMSE" in fit and "gpt-4-1106-preview" in fit and "mistralai/mistral-7b-chat" in fit
    assert re.search(r"budget: 25% of the most expensive LLM's cost -> cost weight \(lambda\) [0-9.e+]+", out)
    assert "on the held-out (cross-fitted) curve: " in out
    assert re.search(r"prior: ridge [0-9.e+]+ on the embedding, domain intercepts' precision (0\.1|1e\+03) ", out)


@pytest.mark.slow
def test_eval_budgets_and_cost_weights_grids(readme_run):
    """--budgets / --cost-weights (the README's third eval) on the default reference; report.json
    compact (no per-task points) unless --full-report."""
    d, out, _, _ = readme_run
    rep = json.loads((d / "runs" / "eval-budgets" / "report.json").read_text())
    assert rep["reference"] == "gpt-4-1106-preview"  # the default: the most expensive LLM
    assert rep["cost_weights"] == [0.0, 30.0, 100.0, 300.0, 1000.0, 3000.0]
    assert rep["budgets_pct"] == [10.0, 24.18, 50.0]
    assert [p["cost_weight"] for p in rep["methods"]["mixllm"]["points"]] == rep["cost_weights"]
    assert [p["budget_pct"] for p in rep["methods"]["mixllm@budgets"]["points"]] == [10.0, 24.18, 50.0]
    assert [b["budget_pct"] for b in rep["budgets"]] == [10.0, 24.18, 50.0]
    assert "quality% @ cost<=10% (cost%)" in out and "quality% @ cost<=50% (cost%)" in out
    assert all("points" not in pt for m in rep["methods"].values() for pt in m["per_task"].values())


@pytest.mark.slow
def test_eval_test_only_file_no_baselines_and_full_report(readme_run, capsys):
    from mixllm_jax import cli

    d, _, _, _ = readme_run
    argv = ["eval", "--router", str(d / "checkpoints" / "example"), "--data", str(d / "test.jsonl"),
            "--models", str(d / "examples" / "models.json"), "--no-baselines", "--out"]
    cli.main(argv + [str(d / "test-only"), "--full-report"])
    assert "| mixllm |" in capsys.readouterr().out
    full = json.loads((d / "test-only" / "report.json").read_text())
    assert all("points" in pt for m in full["methods"].values() for pt in m["per_task"].values())
    assert (d / "runs" / "eval-budgets" / "report.json").stat().st_size < (d / "test-only" / "report.json").stat().st_size
    # --compare: another router on the same queries, paired bootstrap of the difference (itself: exactly 0)
    cli.main(argv + [str(d / "compare"), "--compare", str(d / "checkpoints" / "example")])
    boot = json.loads((d / "compare" / "report.json").read_text())["bootstrap"]["compare"]
    assert boot["aiq"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert boot["task_mean_quality"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_readme_replicas_command_parses():
    """The serve line of docs/replicas.md (with $i = 1) is accepted, and its config checks."""
    from mixllm_jax import cli
    from mixllm_jax.serve import config_from_args

    block = re.search(r"```sh\n(.*?)```", (DOCS / "replicas.md").read_text(), re.S).group(1)
    line = next(c for c in re.sub(r"\\\n\s*", " ", block).splitlines() if "mixllm-jax serve" in c)
    argv = shlex.split(line.strip().replace("$i", "1").rstrip("&"), comments=True)
    args, rest = cli.build_parser().parse_known_args(argv[1:])
    assert not rest, rest
    cfg = config_from_args(args)
    cfg.check()
    assert (cfg.cluster.url, cfg.cluster.replica, cfg.cluster.concurrency_share) == ("nats://127.0.0.1:4222", "r1",
                                                                                    0.34)

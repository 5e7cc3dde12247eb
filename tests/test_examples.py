"""examples/ and the commands of the docs, run as written through the installed console script.

`test_readme_walk_through`: the README's five-minute path on examples/, as the README writes it:
`.venv/bin/mixllm-jax train` (exit status 0) and `route`, the stub backend (`python
tests/stub_backend.py`), `mixllm-jax serve` over loopback, the README's Python block (the official
`openai` SDK: a chat call, then feedback), and the server stopped by SIGTERM (exit status 0).

`test_doc_commands_run`: every `mixllm-jax ...` command of the fenced shell blocks (sh, bash, shell,
console) of README.md and docs/*.md, run through `Path(sys.executable).parent / "mixllm-jax"` in the
walk-through's folder, after it (so `checkpoints/example` and the served log
`checkpoints/example.serve` exist), in document order (README.md, docs/cli.md, then docs/*.md
alphabetically), each distinct command once; every exit status must be 0. A `serve` command is
started, must answer /healthz, and must exit 0 on SIGTERM. Their output is then checked (train's
summary, eval's tables, reports and grids, `--full-report`, `--compare`), and train, eval, route and
ope must exit 2 on user errors.

What is substituted, and only that:
- ports: the stub backend's 9001 (in the command and in the folder's copy of examples/backends.yaml)
  and every `serve --port` (8000 and others) become free ports; `serve --host 0.0.0.0` binds
  127.0.0.1 (the tests never listen beyond loopback); the README's Python block gets the server's
  port in its base_url;
- `python` in the README's stub line is the running interpreter;
- MIXLLM_CACHE is a test cache folder (MIXLLM_TEST_CLI_CACHE, default ~/.cache/mixllm-jax/cli-tests:
  embeddings and compiled code persist between runs), JAX_PLATFORMS=cpu.

What is not run:
- lines without `mixllm-jax`: `make ...` (make test is the command running this), `curl ...`
  (docs/gateway.md's are sent as written by tests/test_gateway.py), `python ...` (the stub backend:
  run by the walk-through; `python -m benchmarks...`), `benchmarks/gpu.sh` (tests/test_mesh.py runs
  its smoke mode), `.venv/bin/nats-server` (tests/test_cluster.py starts NATS), and the shell's
  `for`/`done` and `VAR=...` lines (the variables are expanded into the commands that use them);
  `test_skipped_lines_are_known` fails on a line of any other kind;
- blocks marked `<!-- doc-commands: parsed, not run (REASON) -->` on the line above the fence: the
  experiments, ablations, `run`, `bench`, `distill-encoder`, the recipes of measured figures on the
  shared data (minutes to hours each), the replicas over NATS and the multi-process line (which waits
  for a second process). `test_parsed_commands_parse` checks each of their commands with the
  command line's own parser (every option known, every value of the right type; `a|b|c`
  alternatives one by one).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_helpers import START_TIMEOUT_S, free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "mixllm-jax"
DOCS = [REPO / "README.md", REPO / "docs" / "cli.md",
        *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]
SHELLS = ("sh", "bash", "shell", "console")
BLOCK = re.compile(r"(?:<!-- doc-commands: (?P<mark>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
NOT_RUN = "parsed, not run"
SKIPPED_FIRST_WORDS = {"make", "curl", "python", "benchmarks/gpu.sh", ".venv/bin/nats-server", "done"}
RUN_TIMEOUT_S = 600  # a bound on one command (a cold train on a loaded 2-core machine took 3 min), not a speed claim


# ---------------------------------------------------------------------------------------------
# Reading the docs


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _expand(line: str, env: dict) -> str:
    """$NAME and ${NAME} replaced by the block's variables (or the environment's: $HOME)."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: env.get(m[1], os.environ.get(m[1], m[0])), line)


def _alternatives(argv: list[str]) -> list[list[str]]:
    """`experiment a | b | c` (the tokens split at "|") -> one argv per alternative."""
    words: list[list[str]] = []
    for i, t in enumerate(argv):
        if t == "|":
            continue
        if i > 0 and argv[i - 1] == "|":
            words[-1].append(t)
        else:
            words.append([t])
    out = [[]]
    for alts in words:
        out = [o + [a] for o in out for a in alts]
    return out


def doc_commands() -> tuple[list[dict], list[dict]]:
    """(commands, skipped lines) of the fenced shell blocks of DOCS, in order. A command:
    {"doc", "line", "argv" (after `mixllm-jax`), "run" (False in a block marked parsed-not-run),
    "background" (ends with &)}; a skipped line: {"doc", "line", "word"}."""
    commands, skipped = [], []
    for doc in DOCS:
        for m in BLOCK.finditer(doc.read_text()):
            if m["lang"] not in SHELLS:
                continue
            run = not (m["mark"] or "").startswith(NOT_RUN)
            env: dict[str, str] = {}
            for line in re.sub(r"\\\n\s*", " ", m["body"]).splitlines():
                toks = _tokens(line)
                if not toks:
                    continue
                if all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t) for t in toks):  # VAR=value
                    for t in toks:
                        k, v = t.split("=", 1)
                        env[k] = _expand(v, env)
                    continue
                if toks[0] == "for" and "in" in toks:  # for NAME in V1 V2 ...; do: NAME = V1
                    env[toks[1]] = toks[toks.index("in") + 1]
                toks = _tokens(_expand(line, env))
                segments, cur = [], []
                for t in toks + [";"]:
                    if t in (";", "&&", "&", "||"):
                        if cur:
                            segments.append((cur, t == "&"))
                        cur = []
                    elif t != "do":
                        cur.append(t)
                for seg, background in segments:
                    at = [i for i, t in enumerate(seg) if t == "mixllm-jax" or t.endswith("/mixllm-jax")]
                    if at:
                        for argv in _alternatives(seg[at[0] + 1:]):
                            commands.append({"doc": doc.relative_to(REPO).as_posix(), "line": line.strip(),
                                             "argv": argv, "run": run, "background": background})
                    elif seg[0] != "for":
                        first = next(t for t in seg if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t))
                        skipped.append({"doc": doc.relative_to(REPO).as_posix(), "line": line.strip(),
                                        "word": first})
    return commands, skipped


def readme_python_block() -> str:
    blocks = [m["body"] for m in BLOCK.finditer((REPO / "README.md").read_text()) if m["lang"] == "python"]
    assert len(blocks) == 1, "the README has one Python block: the five-minute path's client"
    return blocks[0]


# ---------------------------------------------------------------------------------------------
# Running commands


def _env(tmp: Path) -> dict:
    cache = Path(os.environ.get("MIXLLM_TEST_CLI_CACHE", Path.home() / ".cache" / "mixllm-jax" / "cli-tests"))
    return dict(os.environ, MIXLLM_CACHE=str(cache), JAX_PLATFORMS="cpu", TRANSFORMERS_VERBOSITY="error",
                PATH=f"{CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_cli(folder: Path, argv: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    res = subprocess.run([str(CLI), *argv], cwd=folder, env=_env(folder), capture_output=True, text=True,
                         timeout=timeout)
    print(f"{time.perf_counter() - t0:6.1f} s  mixllm-jax {shlex.join(argv)}")  # shown with pytest -s
    return res


def _set_option(argv: list[str], name: str, value: str) -> list[str]:
    argv = list(argv)
    if name in argv:
        argv[argv.index(name) + 1] = value
    else:
        argv += [name, value]
    return argv


def serve_argv(argv: list[str], port: int) -> list[str]:
    """A doc's serve command with its port replaced by `port` and a non-loopback host by 127.0.0.1."""
    argv = _set_option(argv, "--port", str(port))
    if "--host" in argv:
        argv = _set_option(argv, "--host", "127.0.0.1")
    return argv


def observations_after_feedback(served, model: str, expected: float = 96 + 1, wait_s: float = 30.0) -> dict:
    """GET /v1/models' observations per LLM, polled (bounded) until `model` has `expected`: its 96
    training outcomes plus the walk-through's one feedback, which the server applies after
    acknowledging it."""
    deadline = time.monotonic() + wait_s
    while True:
        r = httpx.get(served.url + "/v1/models", timeout=60, headers={"authorization": "Bearer mxk_demo-route-key"})
        obs = {m["id"]: m["observations"] for m in r.json()["data"] if m.get("kind") == "llm"}
        if obs.get(model) == expected or time.monotonic() > deadline:
            return obs
        time.sleep(0.2)


class Served:
    """A `mixllm-jax serve` child process of the walk-through's folder."""

    def __init__(self, folder: Path, argv: list[str], name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = serve_argv(argv, self.port)
        self.log = folder / f"{name}.log"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(CLI), *self.argv], cwd=folder, env=_env(folder),
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        try:
            wait_http(self.proc, self.url + "/healthz", self.log, START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        print(f"{time.perf_counter() - t0:6.1f} s  mixllm-jax {shlex.join(self.argv)} (until /healthz)")

    def stop(self) -> int:
        """SIGTERM, then the exit status (bounded wait)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"serve did not stop within 120 s of SIGTERM:\n{self.log.read_text()[-3000:]}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _failure(what, res) -> str:
    return f"{what}: exit status {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------
# The walk-through


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """The README's five-minute path in a fresh folder holding a copy of examples/ (backends.yaml on
    the stub's free port) and tests/stub_backend.py. Yields what each step gave; the doc-command
    test goes on in the same folder."""
    folder = tmp_path_factory.mktemp("walk")
    shutil.copytree(REPO / "examples", folder / "examples")
    (folder / "tests").mkdir()
    shutil.copy(REPO / "tests" / "stub_backend.py", folder / "tests" / "stub_backend.py")
    readme = [c for c in doc_commands()[0] if c["doc"] == "README.md"]
    train = next(c["argv"] for c in readme if c["argv"][0] == "train")
    route = next(c["argv"] for c in readme if c["argv"][0] == "route")
    serve = next(c["argv"] for c in readme if c["argv"][0] == "serve")
    stub_line = next(line for line in re.sub(r"\\\n\s*", " ", (REPO / "README.md").read_text()).splitlines()
                     if line.startswith("python tests/stub_backend.py"))
    out = {"folder": folder, "ran": [train, route, serve]}

    out["train"] = run_cli(folder, train)
    out["route"] = run_cli(folder, route) if out["train"].returncode == 0 else None

    stub_port = free_port()
    stub_argv = [a.replace("9001", str(stub_port)) for a in _tokens(stub_line) if a != "&"]
    assert stub_argv[0] == "python" and str(stub_port) in stub_argv
    backends = folder / "examples" / "backends.yaml"
    assert "127.0.0.1:9001" in backends.read_text()
    backends.write_text(backends.read_text().replace("127.0.0.1:9001", f"127.0.0.1:{stub_port}"))
    stub_log = folder / "stub.log"
    stub = subprocess.Popen([sys.executable, *stub_argv[1:]], cwd=folder, stdout=open(stub_log, "w"),
                            stderr=subprocess.STDOUT)
    served = None
    try:
        wait_http(stub, f"http://127.0.0.1:{stub_port}/_health", stub_log, START_TIMEOUT_S)
        out["stub_url"] = f"http://127.0.0.1:{stub_port}"
        if out["route"] is not None:
            served = Served(folder, serve, "serve-readme")
            code = readme_python_block().replace("127.0.0.1:8000", f"127.0.0.1:{served.port}")
            assert str(served.port) in code
            ns: dict = {}
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, "README.md", "exec"), ns)
            out["client"], out["printed"] = ns, printed.getvalue()
            out["observations"] = observations_after_feedback(served, ns["answer"].mixllm["model"])
            out["stub_requests"] = httpx.get(out["stub_url"] + "/_requests", timeout=60).json()
            out["serve_exit"] = served.stop()
            out["serve_log"] = served.log.read_text()
        yield out
    finally:
        if served is not None:
            served.kill()
        stub.kill()
        stub.wait(10)


@pytest.mark.slow
def test_readme_walk_through(walk):
    assert walk["train"].returncode == 0, _failure("mixllm-jax " + " ".join(walk["ran"][0]), walk["train"])
    assert "router saved to checkpoints/example" in walk["train"].stdout
    assert walk["route"].returncode == 0, _failure("mixllm-jax " + " ".join(walk["ran"][1]), walk["route"])
    assert "chosen:" in walk["route"].stdout
    names = {"large-llm", "medium-llm", "small-llm"}
    answer, feedback = walk["client"]["answer"], walk["client"]["feedback"]
    assert answer.mixllm["model"] in names and answer.choices[0].message.content
    assert feedback["request_id"] == answer.mixllm["request_id"] and feedback["model"] == answer.mixllm["model"]
    assert [r["kind"] for r in feedback["recorded"]] == ["quality"]
    assert "answered:" in walk["printed"] and "'recorded'" in walk["printed"]
    # the call reached the chosen LLM's backend (the stub), and the feedback counts as an observation
    assert any(r["body"]["messages"][-1]["content"] == "Solve for x: 3x + 5 = 20." for r in walk["stub_requests"])
    obs = walk["observations"]  # each LLM has 96 training outcomes
    assert set(obs) == names and obs[answer.mixllm["model"]] == 96 + 1, obs
    assert walk["serve_exit"] == 0, walk["serve_log"][-3000:]
    journal = "".join(p.read_text() for p in (walk["folder"] / "checkpoints" / "example.serve").rglob("*.jsonl"))
    assert answer.mixllm["request_id"] in journal


@pytest.fixture(scope="module")
def doc_runs(walk):
    """Every command of the run tier, as written (see the module docstring), in the walk-through's
    folder after it: {"ran": [(doc, command)], "failures": [...], "out": {argv tuple: stdout}}."""
    folder = walk["folder"]
    done = {tuple(a) for a in walk["ran"]}
    ran, failures, out = [], [], {}
    for c in doc_commands()[0]:
        if not c["run"] or tuple(c["argv"]) in done:
            continue
        done.add(tuple(c["argv"]))
        if c["argv"][0] == "serve":
            srv = Served(folder, c["argv"], f"serve-{len(ran)}")
            code = srv.stop()
            if code != 0:
                failures.append(f"{c['doc']}: {c['line']}: serve exited {code} on SIGTERM\n{srv.log.read_text()[-2000:]}")
        else:
            res = run_cli(folder, c["argv"])
            if res.returncode != 0:
                failures.append(f"{c['doc']}: " + _failure(c["line"], res))
            out[tuple(c["argv"])] = res.stdout
        ran.append((c["doc"], c["argv"][0]))
    return {"ran": ran, "failures": failures, "out": out}


@pytest.mark.slow
def test_doc_commands_run(doc_runs):
    """Every command of the run tier exits 0."""
    ran = doc_runs["ran"]
    assert not doc_runs["failures"], "\n\n".join(doc_runs["failures"])
    kinds = {k for _, k in ran}
    assert {"eval", "route", "simulate", "ope", "serve", "hash-key"} <= kinds, ran
    assert {d for d, _ in ran} >= {"docs/cli.md", "docs/serving.md"}, ran


# ---------------------------------------------------------------------------------------------
# What the walk-through's commands print and write (docs/cli.md's train, eval and route lines)


@pytest.mark.slow
def test_train_ends_with_a_summary(walk):
    out = walk["train"].stdout
    assert re.search(r"\n  \d+ domains \(training queries nearest to each\): (writing|code|math|facts) \(\d+\)", out)
    fit = out.split("fit on the training log (in-sample):")[1].split("budget:")[0]
    assert "quality RMSE" in fit and all(m in fit for m in ("large-llm", "medium-llm", "small-llm"))
    assert re.search(r"budget: 25% of the most expensive LLM's cost -> cost weight \(lambda\) [0-9.e+]+", out)
    assert "on the held-out (cross-fitted) curve: " in out
    assert re.search(r"prior: ridge [0-9.e+]+ on the embedding, domain intercepts' precision (0\.1|1e\+03) ", out)
    assert any(p.name.isdigit() for p in (walk["folder"] / "checkpoints" / "example").iterdir())  # a numbered step


def _eval_out(doc_runs, *words) -> str:
    """The stdout of the doc's eval command holding every one of `words`."""
    return next(o for a, o in doc_runs["out"].items() if a[0] == "eval" and all(w in a for w in words))


@pytest.mark.slow
def test_eval_reports_and_grids(walk, doc_runs):
    d = walk["folder"]
    out = _eval_out(doc_runs, "runs/eval")
    for name in ("mixllm", "oracle", "random_mix", "per_task_best", "knn", "mlp", "ridge", "mixllm@budget"):
        assert f"| {name} |" in out  # the first eval's table, with the baselines
    # runs/eval/report.json: the second eval's (the ood split, no baselines, the default --out)
    rep = json.loads((d / "runs" / "eval" / "report.json").read_text())
    assert rep["reference"] == "large-llm" and rep["n_queries"] == 8  # the default: the most expensive LLM
    assert {"mixllm", "mixllm@budget", "large-llm"} <= set(rep["methods"]) and "knn" not in rep["methods"]
    pts = rep["methods"]["mixllm"]["points"]
    assert {"cost_weight", "cost_pct", "quality_pct"} <= set(pts[0])
    assert pts[-1]["cost_pct"] <= pts[0]["cost_pct"]  # a higher cost weight never costs more on average
    assert (d / "runs" / "eval" / "curves.png").stat().st_size > 10_000
    # --budgets / --cost-weights; report.json compact (no per-task points) unless --full-report
    rep = json.loads((d / "runs" / "eval-budgets" / "report.json").read_text())
    assert rep["cost_weights"] == [0.0, 30.0, 100.0, 300.0, 1000.0, 3000.0]
    assert rep["budgets_pct"] == [10.0, 24.18, 50.0]
    assert [p["cost_weight"] for p in rep["methods"]["mixllm"]["points"]] == rep["cost_weights"]
    assert [p["budget_pct"] for p in rep["methods"]["mixllm@budgets"]["points"]] == [10.0, 24.18, 50.0]
    assert [b["budget_pct"] for b in rep["budgets"]] == [10.0, 24.18, 50.0]
    out = _eval_out(doc_runs, "runs/eval-budgets")
    assert "quality% @ cost<=10% (cost%)" in out and "quality% @ cost<=50% (cost%)" in out
    assert all("points" not in pt for m in rep["methods"].values() for pt in m["per_task"].values())
    route = next(o for a, o in doc_runs["out"].items() if a[0] == "route" and "--budget" in a)
    assert "chosen:" in route


@pytest.mark.slow
def test_eval_full_report_and_compare(walk, doc_runs):
    """--full-report on a test-only file; --compare: another router on the same queries, paired
    bootstrap of the difference (itself: exactly 0)."""
    d = walk["folder"]
    test = d / "test-only.jsonl"
    test.write_text("".join(line + "\n" for line in (d / "examples" / "logs.jsonl").read_text().splitlines()
                            if '"split": "test"' in line))
    argv = ["eval", "--router", "checkpoints/example", "--data", test.name, "--models", "examples/models.json",
            "--no-baselines", "--out"]
    assert run_cli(d, argv + ["test-only", "--full-report"]).returncode == 0
    full = json.loads((d / "test-only" / "report.json").read_text())
    assert full["n_queries"] == 24
    assert all("points" in pt for m in full["methods"].values() for pt in m["per_task"].values())
    assert (d / "runs" / "eval-budgets" / "report.json").stat().st_size < (d / "test-only" / "report.json").stat().st_size
    res = run_cli(d, argv + ["compare", "--compare", "checkpoints/example"])
    assert res.returncode == 0, _failure("eval --compare", res)
    boot = json.loads((d / "compare" / "report.json").read_text())["bootstrap"]["compare"]
    assert boot["aiq"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert boot["task_mean_quality"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


@pytest.mark.slow
def test_user_errors_exit_2_through_the_console_script(walk, doc_runs):
    """Exit status 2 and one line naming the problem, no traceback (issue 24, item 7; the successes
    are the commands above, each exit status 0)."""
    from mixllm_jax.offline import ope

    d = walk["folder"]
    names = ["large-llm", "medium-llm", "small-llm"]
    rng, n = np.random.default_rng(0), 8
    ope.write_log(d / "bad.jsonl", rng.normal(size=(n, 3)).astype(np.float32), np.full(n, 50.0),
                  [names[0]] * n, np.ones(n), np.ones(n))  # the router's features have other dimensions
    data_opts = ["--data", "examples/logs.jsonl", "--models", "examples/models.json"]
    for argv, said in ((["train", "--data", "missing.jsonl", "--models", "examples/models.json"], "missing.jsonl"),
                       (["eval", "--router", "checkpoints/example", *data_opts, "--reference", "gpt-5"],
                        "--reference 'gpt-5'"),
                       (["route", "--router", "no-such-checkpoint", "hi"], "no checkpoint"),
                       (["ope", "--log", "bad.jsonl", "--router", "checkpoints/example"], "dimensions"),
                       (["train", "--no-such-option"], "unrecognized arguments")):
        r = run_cli(d, argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr[-3000:])
        assert said in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr[-3000:])


# ---------------------------------------------------------------------------------------------
# Cheap checks of the docs and examples/


def test_doc_commands_found():
    commands, _ = doc_commands()
    run = [c for c in commands if c["run"]]
    assert len(run) >= 12 and len(commands) - len(run) >= 20
    readme = [c["argv"][0] for c in commands if c["doc"] == "README.md"]
    assert readme == ["train", "route", "serve"]  # the five-minute path
    # a run-tier command runs in the foreground on the example files (no placeholders)
    for c in run:
        assert not c["background"] and not any(a in ("LOG", "...", "CKPT") or a.startswith("[") for a in c["argv"]), c


def test_parsed_commands_parse():
    """Every command of README.md and docs/*.md (both tiers) is accepted by the command line's parser;
    `bench` passes its options on to benchmarks.throughput, so they are looked up in its --help."""
    from mixllm_jax import cli

    ap = cli.build_parser()
    bench_help = None
    for c in doc_commands()[0]:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                args, rest = ap.parse_known_args(c["argv"])
            except SystemExit:
                pytest.fail(f"{c['doc']}: {c['line']}: {err.getvalue().strip()}")
        if c["argv"][0] == "bench":
            if bench_help is None:
                bench_help = run_cli(REPO, ["bench", "--help"], timeout=120).stdout
            rest = [a for a in rest if a.startswith("-") and a.split("=")[0] not in bench_help]
        assert not rest and callable(args.fn), (c["doc"], c["line"], rest)


def test_skipped_lines_are_known():
    _, skipped = doc_commands()
    unknown = [s for s in skipped if s["word"] not in SKIPPED_FIRST_WORDS]
    assert not unknown, f"lines the doc-command test neither runs nor knows to skip: {unknown}"


def test_readme_is_short_and_keeps_the_make_targets():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in ("make test ", "make test-fast", "make run"):
        assert target in text


def test_examples_logs_are_reproducible_and_in_the_readme():
    """make_logs.py writes logs.jsonl exactly; the README's log line is one of its lines; it loads."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_logs
    finally:
        sys.path.remove(str(REPO / "examples"))
    lines = (REPO / "examples" / "logs.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == make_logs.rows()
    shown = next(m["body"] for m in BLOCK.finditer((REPO / "README.md").read_text()) if m["lang"] == "json")
    assert json.loads(shown) in [json.loads(x) for x in lines]

    from mixllm_jax import data

    ds = data.load_jsonl(REPO / "examples" / "logs.jsonl", REPO / "examples" / "models.json")
    assert ds.report["queries"] == 128 and ds.report["outcomes"] == 384 and ds.report["errors"] == []
    assert sorted(set(ds.split)) == ["ood", "test", "train"]


def test_example_keys_are_the_documented_ones():
    from mixllm_jax.serve.auth import load_keys

    keys = load_keys(REPO / "examples" / "keys.yaml")
    found = {k.name: sorted(k.roles) for k in keys.values()}
    assert found == {"demo-app": ["feedback", "route"], "demo-admin": ["admin"]}
    from mixllm_jax.serve.auth import hash_key

    assert keys[hash_key("mxk_demo-route-key")].name == "demo-app"
    assert keys[hash_key("mxk_demo-admin-key")].name == "demo-admin"
    for plain in ("mxk_demo-route-key", "mxk_demo-admin-key"):
        assert plain in (REPO / "examples" / "README.md").read_text() and plain in (REPO / "README.md").read_text()

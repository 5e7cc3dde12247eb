"""The docs' Python examples run as written, and docs/cli.md's "Commands" block and docs/replicas.md's
serve line parse. (The README's walk-through and every command of the docs, run through the installed
console script, and what docs/cli.md's train, eval and route lines print and write: test_examples.py.)"""
import re
import shlex
from pathlib import Path



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

"""mixllm-jax command line: train, evaluate and query routers.

    mixllm-jax train --data DIR_OR_JSONL --models models.json --out checkpoints/NAME
    mixllm-jax eval  --router checkpoints/NAME --data ... --reference gpt-4-1106-preview --out runs/eval
    mixllm-jax route --router checkpoints/NAME "some prompt" ["another" ...]
    mixllm-jax run                 # the main job: train on the RouterBench slice, evaluate on its test split
    mixllm-jax ablation head       # tag-enhanced head vs none;  `ablation truncation`: left vs right
    mixllm-jax simulate            # a query stream under load: quality, cost, waits, satisfaction
    mixllm-jax experiment NAME     # latency | continual | llm-changes | out-of-domain (JSON, table, plot)
    mixllm-jax serve --checkpoint checkpoints/NAME --backends backends.yaml   # HTTP router + proxy
    mixllm-jax bench --quick       # throughput suite (JSON, markdown, plots in runs/bench)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner


def _load_data(path: str | None, models: str | None, split: str):
    """RouterBench folder (default: the shared slice) or a long-format JSONL file."""
    from mixllm_jax import data

    if path is None or Path(path).is_dir():
        return data.load_routerbench(path, split=split)
    if models is None:
        raise SystemExit("--models is required with a JSONL data file")
    ds = data.load_jsonl(path, models)
    parts = ds.by_split()
    if split not in parts:
        raise SystemExit(f"{path} has no rows with split {split!r} (splits: {sorted(parts)})")
    return parts[split]


def _models(path: str | None):
    from mixllm_jax import data

    return data.load_models(path or data.routerbench_dir() / "models.json")


def cmd_train(args) -> Path:
    from mixllm_jax import distributed, encoder, tags, train

    par = distributed.from_args(args)  # first: jax.distributed and device counts precede any device use
    ds = _load_data(args.data, args.models, "train")
    print(f"training on {len(ds)} queries x {len(ds.models)} LLMs")
    enc = encoder.load_encoder(args.encoder)
    head = None if args.no_head else tags.HeadConfig(epochs=args.epochs, tag_weight=args.tag_weight)
    router = train.train_router(ds, _models(args.models), enc, head_config=head, max_length=args.max_length,
                                truncation_side=args.truncation, feature_mode="raw" if args.no_head else args.features,
                                **par.train_kwargs(enc, ds, args.max_length, args.truncation))
    from mixllm_jax import checkpoint

    step = checkpoint.save_router(router, args.out)
    print(f"router saved to {args.out} (step {step})")
    return Path(args.out)


def _report_out(report, out: Path, title: str):
    from mixllm_jax import evaluate

    files = evaluate.write_report(report, out)
    print(f"\n{title} ({report['n_queries']} test queries, % of {report['reference']})\n")
    print(evaluate.format_table(report))
    print("\nper task:\n" + evaluate.format_task_table(report))
    print(f"\nreport: {files['json']}\ntable:  {files['md']}\nplot:   {files['png']}")


def _restore(args):
    from mixllm_jax import checkpoint

    return checkpoint.restore_router(args.router, step=args.step)[0]


def cmd_eval(args):
    from mixllm_jax import distributed, pipeline

    par = distributed.from_args(args)
    router = _restore(args)
    report = pipeline.evaluate_router(router, _load_data(args.train_data or args.data, args.models, "train"),
                                      _load_data(args.data, args.models, "test"), args.reference,
                                      with_baselines=not args.no_baselines, **par.eval_kwargs(router))
    if par.writer:
        _report_out(report, Path(args.out), "evaluation")


def cmd_run(args):
    """Train on the RouterBench slice's train split, evaluate on its test split."""
    args.data = args.models = None
    args.encoder, args.no_head, args.epochs, args.tag_weight, args.features = None, False, 300, 1.0, "raw+domain"
    args.out = args.router_out
    router_dir = cmd_train(args)
    args.router, args.step, args.train_data = router_dir, None, None
    args.reference, args.no_baselines = "gpt-4-1106-preview", False
    args.out = args.report_out
    cmd_eval(args)


def cmd_ablation(args):
    from mixllm_jax import encoder, pipeline

    report = pipeline.ablation(args.kind, _load_data(args.data, args.models, "train"),
                               _load_data(args.data, args.models, "test"), _models(args.models),
                               encoder.load_encoder(args.encoder), Path(args.out), max_length=args.max_length)
    print(f"\nablation '{args.kind}': best quality % of {report['reference']} at cost <= each level\n")
    print(report["cost_levels_table"])
    print(f"\nreport and plot in {args.out}")


def cmd_simulate(args):
    from mixllm_jax import experiments

    report = experiments.simulate_main(
        out_dir=args.out, rate=args.rate, arrival=args.arrival, batch_s=args.batch_s,
        refresh_s=args.refresh_s, tolerance_s=args.tolerance, cost_weight=args.cost_weight,
        beta=args.beta, tau=args.tau, alpha=args.alpha, repeat=args.repeat, seed=args.seed,
        router_path=args.router, quick=args.quick)
    print(Path(report["paths"]["md"]).read_text())
    print(f"written: {', '.join(str(p) for p in report['paths'].values())}")


def cmd_experiment(args):
    from mixllm_jax import experiments

    report = experiments.run_experiment(args.name, args.out, quick=args.quick)
    print(Path(report["paths"]["md"]).read_text())
    print(f"written: {', '.join(str(p) for p in report['paths'].values())}")


def cmd_bench(args, rest):
    """The throughput suite (benchmarks/ in the repository): `mixllm-jax bench --help` lists its options."""
    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks" / "throughput.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from benchmarks import throughput
    except ImportError:
        raise SystemExit("the benchmark suite lives in the repository's benchmarks/ folder: run from a checkout")
    return throughput.main(rest)


def cmd_route(args):
    router = _restore(args)
    if args.cost_weight is not None:
        router.policy = router.policy.replace(cost_weight=args.cost_weight)
    for text, r in zip(args.prompts, router.route(args.prompts)):
        print(f"> {text[:100]!r}\n  chosen: {r.model}" + (f"   (nearest domain: {r.domain})" if r.domain else ""))
        print(f"  {'LLM':40s} {'quality':>8s} {'cost $':>10s} {'uncert.':>8s} {'penalty':>8s} {'score':>9s}")
        for m in sorted(r.score, key=r.score.get, reverse=True):
            print(f"  {m:40s} {r.quality[m]:8.3f} {r.cost[m]:10.6f} {r.uncertainty[m]:8.4f} "
                  f"{r.penalty[m]:8.3f} {r.score[m]:9.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mixllm-jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument("--data", help="RouterBench folder or long-format JSONL (default: the shared RouterBench slice)")
        p.add_argument("--models", help="models file (prices per million tokens; default: RouterBench's models.json)")

    p = sub.add_parser("train", help="train a router on logged outcomes and save it")
    data_args(p)
    p.add_argument("--out", default="checkpoints/router",
                   help="checkpoint directory; each train adds a numbered step (the last 3 are kept)")
    p.add_argument("--encoder", default=None, help="HF id or local folder (default all-MiniLM-L6-v2)")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
    p.add_argument("--truncation", choices=("left", "right"), default="left",
                   help="which end of a long prompt is cut (left keeps the question at the end)")
    p.add_argument("--epochs", type=int, default=300, help="tag-enhanced head training epochs")
    p.add_argument("--tag-weight", type=float, default=1.0, help="weight of the tag losses (0: regression only)")
    p.add_argument("--features", choices=("raw+domain", "head", "raw"), default="raw+domain",
                   help="bandit features: embedding + nearest-domain one-hot (tag-enhanced), the head's "
                        "features, or the raw embedding")
    p.add_argument("--no-head", action="store_true", help="train no tag head; route on raw encoder embeddings")
    from mixllm_jax import distributed  # light: jax is imported when a command runs

    distributed.add_arguments(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved router and the baselines: table, report.json, plot")
    data_args(p)
    p.add_argument("--router", required=True, help="a checkpoint directory (see train --out)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--train-data", help="data the baselines are fitted on (default: --data's train split)")
    p.add_argument("--reference", default="gpt-4-1106-preview", help="the LLM whose totals are 100%%")
    p.add_argument("--out", default="runs/eval", help="folder for report.json, report.md, curves.png")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the router alone")
    distributed.add_arguments(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", help="the main job: train on the RouterBench slice, evaluate on its test split")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
    p.add_argument("--truncation", choices=("left", "right"), default="left", help="which end of a long prompt is cut")
    p.add_argument("--router-out", default="checkpoints/routerbench", help="where the router is saved")
    p.add_argument("--report-out", default="runs/routerbench", help="where the report goes")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("ablation", help="train variants and compare them: 'head' (tag head vs none) or 'truncation'")
    data_args(p)
    p.add_argument("kind", choices=("head", "truncation"))
    p.add_argument("--encoder", default=None, help="HF id or local folder (default all-MiniLM-L6-v2)")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
    p.add_argument("--out", default=None, help="report folder (default runs/ablation-KIND)")
    p.set_defaults(fn=cmd_ablation)

    p = sub.add_parser("route", help="route prompts with a saved router and explain each decision")
    p.add_argument("--router", required=True, help="a checkpoint directory (see train --out)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--cost-weight", type=float, help="override lambda (quality per USD)")
    p.add_argument("prompts", nargs="+")
    p.set_defaults(fn=cmd_route)

    p = sub.add_parser("simulate", help="stream the test split through a router under load (latency model; "
                                        "RouterBench latency profiles are assumptions)")
    p.add_argument("--router", help="a checkpoint directory (default: train one on the RouterBench slice)")
    p.add_argument("--rate", type=float, default=10.0, help="queries per second (default 100 per 10 s)")
    p.add_argument("--arrival", choices=("uniform", "poisson"), default="uniform", help="arrival process")
    p.add_argument("--batch-s", type=float, default=1.0, help="routing window in seconds")
    p.add_argument("--refresh-s", type=float, default=10.0, help="waiting times refresh interval (0: continuous)")
    p.add_argument("--tolerance", type=float, default=30.0, help="a query waiting longer scores quality 0")
    p.add_argument("--cost-weight", type=float, help="lambda (default: calibrated to 24.18%% of GPT-4's cost)")
    p.add_argument("--beta", type=float, default=0.1, help="latency penalty weight")
    p.add_argument("--tau", type=float, default=10.0, help="wait (s) above which the penalty starts")
    p.add_argument("--alpha", type=float, default=0.01, help="LinUCB exploration weight")
    p.add_argument("--repeat", type=int, default=1, help="stream the test split this many times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small subset on one-hot task features (seconds)")
    p.add_argument("--out", default="runs/simulate", help="folder for simulate.json/.md/.png")
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("experiment", help="reproduce a paper experiment: latency, continual, llm-changes, out-of-domain")
    p.add_argument("name", choices=("latency", "continual", "llm-changes", "out-of-domain"))
    p.add_argument("--quick", action="store_true", help="a small subset on one-hot task features (seconds)")
    p.add_argument("--out", default="runs/experiments", help="folder for NAME.json/.md/.png")
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("serve", help="HTTP router: /v1/route, OpenAI-compatible /v1/chat/completions proxy, "
                                     "feedback, live LLM add/remove, /metrics")
    from mixllm_jax import server  # light: the web stack is imported when the server starts

    server.add_serve_arguments(p)
    p.set_defaults(fn=server.run_from_args)

    p = sub.add_parser("bench", add_help=False,
                       help="throughput suite: route/update/text-to-decision rates, peers side by side "
                            "(options: mixllm-jax bench --help)")
    p.set_defaults(fn=cmd_bench)

    args, rest = ap.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "kind", None) and args.out is None:
        args.out = f"runs/ablation-{args.kind}"
    args.fn(args)


if __name__ == "__main__":
    main()

"""mixllm-jax command line: train, evaluate and query routers.

    mixllm-jax train --data DIR_OR_JSONL --models models.json --budget 25% --out checkpoints/NAME
    mixllm-jax eval  --router checkpoints/NAME --data ... --reference gpt-4-1106-preview --out runs/eval
    mixllm-jax route --router checkpoints/NAME "some prompt" ["another" ...]
    mixllm-jax run                 # the main job: train on the RouterBench slice, evaluate on its test split
    mixllm-jax ablation features   # feature variants on a validation part of train (also domains, ridge, truncation)
    mixllm-jax simulate            # a query stream under load: quality, cost, waits, satisfaction
    mixllm-jax experiment NAME     # latency | continual | llm-changes | out-of-domain | ope (JSON, table, plot)
    mixllm-jax ope --log LOG --router checkpoints/NAME   # off-policy value of a router from a served log
    mixllm-jax serve --checkpoint checkpoints/NAME --backends backends.yaml   # HTTP router + proxy
    mixllm-jax bench --quick       # throughput suite (JSON, markdown, plots in runs/bench)
    mixllm-jax hash-key [--generate]   # the SHA-256 of an API key, for serve --api-keys
    mixllm-jax distill-encoder --out runs/static   # the static encoder tier; then --encoder static:runs/static

An error prints one line ("mixllm-jax: error: ...") and exits with status 2; --debug (before the
command) shows its traceback instead.

route, serve, train, eval and run keep JAX's compiled code in a persistent cache
($MIXLLM_CACHE or ~/.cache/mixllm-jax, in jax/; MIXLLM_COMPILATION_CACHE=off disables it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner
# commands that start from the persistent compilation cache (serve too: its --compilation-cache, default
# the same folder, is applied when the service loads)
COMPILATION_CACHED = ("route", "train", "eval", "run")


def _load_data(path: str | None, models: str | None, split: str):
    """RouterBench folder (default: the shared slice) or a long-format JSONL file."""
    from mixllm_jax import data

    if path is None or Path(path).is_dir():
        return data.load_routerbench(path, split=split)
    if models is None:
        raise ValueError("--models is required with a JSONL data file")
    ds = data.load_jsonl(path, models)
    parts = ds.by_split()
    if split not in parts:
        raise ValueError(f"{path} has no rows with split {split!r} (splits: {sorted(parts)})")
    return parts[split]


def _models(path: str | None):
    from mixllm_jax import data

    return data.load_models(path or data.routerbench_dir() / "models.json")


def router_config(args):
    """The RouterConfig of train-style options (one place: train, run, ablation)."""
    from mixllm_jax.core.config import Budget, FinetuneConfig, HeadConfig, RouterConfig

    finetune = None
    if getattr(args, "finetune_encoder", False):
        kw = {"method": args.finetune_method, "layers": args.finetune_layers, "rank": args.finetune_rank,
              "epochs": args.finetune_epochs}
        if args.finetune_lr is not None:
            kw["learning_rate"] = args.finetune_lr
        finetune = FinetuneConfig(**kw)
    head = None if args.no_head else HeadConfig(epochs=args.epochs, tag_weight=args.tag_weight)
    if args.cost_weight is not None:
        budget = Budget("cost_weight", args.cost_weight)
    elif args.budget_usd is not None:
        budget = Budget("usd", args.budget_usd)
    else:
        budget = Budget.parse(args.budget, args.budget_reference)
    return RouterConfig(max_length=args.max_length, truncation_side=args.truncation,
                        features="raw" if args.no_head else args.features, domains=args.domains,
                        head=head, budget=budget, finetune=finetune)


def cmd_train(args) -> Path:
    from mixllm_jax.store import checkpoint
    from mixllm_jax.offline import distributed, train
    from mixllm_jax.text import encoder
    from mixllm_jax.util import progress

    par = distributed.from_args(args)  # first: jax.distributed and device counts precede any device use
    with progress.step("loading the data"):
        ds = _load_data(args.data, args.models, "train")
    config = router_config(args)
    print(f"training on {len(ds)} queries x {len(ds.models)} LLMs; budget: {config.budget.describe()}")
    with progress.step("loading the encoder"):
        enc = encoder.load_encoder(args.encoder)
    router = train.train_router(ds, _models(args.models), enc, config, **par.train_kwargs(enc, ds, config))
    ft = getattr(router.encoder, "finetune_report", None)
    if ft is not None:
        best = ft["history"][ft["best_epoch"] - 1] if ft["best_epoch"] else None
        print(f"encoder fine-tuned ({config.finetune.method}, {config.finetune.layers} layer(s)): "
              f"{ft['epochs_run']} epochs, best epoch {ft['best_epoch']}"
              + (f", held-out loss {best['val']['loss']:.4f}" if best and "val" in best else "")
              + f"; digest {router.encoder.identity['finetune']}")
    with progress.step("saving the checkpoint"):
        step = checkpoint.save_router(router, args.out)
    e = train.embed(router.encoder, ds, router.max_length, router.truncation_side)  # cached: no re-embedding
    print(format_train_summary(train.summary(router, ds, e)))
    print(f"router saved to {args.out} (step {step})")
    return Path(args.out)


def format_train_summary(s: dict) -> str:
    """The end of `train`: domains, each LLM's fit error, the operating point (train.summary)."""
    lines = ["", "summary"]
    if s["domains"] is None:
        lines.append("  domains: none (no tag head)")
    else:
        doms = sorted(s["domains"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{d} ({n})" for d, n in doms[:12]) + (f", ... {len(doms) - 12} more" if len(doms) > 12 else "")
        lines.append(f"  {len(doms)} domains (training queries nearest to each): {shown}")
    lines.append(f"  fit on the training log (in-sample):\n    {'LLM':40s} {'scored':>7s} {'quality RMSE':>13s} "
                 f"{'cost predicted/logged':>22s}")
    for m, f in s["fit"].items():
        rmse = "-" if f["quality_rmse"] is None else f"{f['quality_rmse']:.4f}"
        ratio = "-" if f["cost_ratio"] is None else f"{f['cost_ratio']:.3f}"
        lines.append(f"    {m:40s} {f['n']:7d} {rmse:>13s} {ratio:>22s}")
    if s.get("ridge") is not None:
        d = s.get("domain_precision")
        dom = "" if d is None else f", domain intercepts' precision {d:.3g} " + (
            "(free)" if d < 1 else "(pulled towards each LLM's mean)")
        lines.append(f"  prior: ridge {s['ridge']:.4g} on the embedding{dom}")
    point = f"cost weight (lambda) {s['cost_weight']:.4g}" + (
        f", {100 * s['mix']:.1f}% of queries at {s['mix_cost_weight']:.4g}" if s["mix"] else "")
    lines.append(f"  budget: {s['budget']} -> {point}")
    if s["held_out"] is not None:
        h = s["held_out"]
        lines.append(f"  on the held-out (cross-fitted) curve: {h['spend_usd']:.3g} USD and quality {h['quality']:.3f} "
                     f"per query ({h['n_queries']} queries)")
    return "\n".join(lines)


def _report_out(report, out: Path, title: str, full: bool = False):
    from mixllm_jax.offline import evaluate
    from mixllm_jax.util import progress

    with progress.step("writing the report and plots"):
        files = evaluate.write_report(report, out, full=full)
    print(f"\n{title} ({report['n_queries']} test queries, % of {report['reference']})\n")
    print(evaluate.format_table(report))
    if "budgets" in report:
        print("\nbudgets met on the router's held-out curve (realised on these queries):\n")
        print(evaluate.format_budget_table(report["budgets"]))
    if report.get("bootstrap"):
        print("\npaired bootstrap over the test queries (95% intervals):\n")
        print(evaluate.format_bootstrap_table(report["bootstrap"]))
    if "calibration" in report:
        print(f"\ncalibration of predicted quality: ECE {report['calibration']['ece']:.4f}")
    print("\nper task:\n" + evaluate.format_task_table(report))
    print(f"\nreport: {files['json']}\ntable:  {files['md']}\nplot:   {files['png']}")


def _restore(args):
    from mixllm_jax.store import checkpoint

    return checkpoint.restore_router(args.router, step=args.step)[0]


def cmd_eval(args):
    from mixllm_jax.offline import distributed, pipeline
    from mixllm_jax.util import progress

    par = distributed.from_args(args)  # first: jax.distributed and device counts precede any device use
    cost_weights = _grid(args.cost_weights, "--cost-weights")
    budgets = _grid(args.budgets, "--budgets", percent=True)
    if args.models is not None and args.reference is not None:  # before the data is even read
        _reference(args.reference, [sp.name for sp in _models(args.models)], "the models file")
    with progress.step("loading the data"):
        test_ds = _load_data(args.data, args.models, args.split)
    reference = _reference(args.reference, test_ds.models, "the data", test_ds.specs)
    with progress.step("loading the router"):
        router = _restore(args)
    unknown = [m for m in test_ds.models if m not in router.registry.slots]
    if unknown:  # before anything is embedded
        raise ValueError(f"the data's LLMs {unknown} are not LLMs of the router "
                         f"(its LLMs: {', '.join(router.registry.slots)})")
    if par.writer:
        print(f"router: {router.config.budget.describe()} (cost weight {router.policy.cost_weight:.4g}); "
              f"reference: {reference}")
    extra = None
    if args.compare:
        from mixllm_jax.store import checkpoint

        with progress.step("loading the router to compare"):
            other = checkpoint.restore_router(args.compare)[0]
        missing = [m for m in test_ds.models if m not in other.registry.slots]
        if missing:
            raise ValueError(f"the data's LLMs {missing} are not LLMs of the --compare router")
        extra = {"compare": pipeline.compare_sweep(other, test_ds, cost_weights)}
    train_ds = None
    if not args.no_baselines:
        with progress.step("loading the training data (baselines)"):
            train_ds = _load_data(args.train_data or args.data, args.models, "train")
    report = pipeline.evaluate_router(router, train_ds, test_ds, reference, with_baselines=not args.no_baselines,
                                      cost_weights=cost_weights, budgets_pct=budgets, extra=extra,
                                      **par.eval_kwargs(router))
    if par.writer:
        _report_out(report, Path(args.out), "evaluation", full=args.full_report)


def _grid(text: str | None, option: str, percent: bool = False) -> list[float] | None:
    """A comma list of numbers >= 0 (--cost-weights 0,10,100; --budgets 10,24.18%,50), ascending."""
    if text is None:
        return None
    vals = []
    for part in text.split(","):
        part = part.strip().removesuffix("%") if percent else part.strip()
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{option} must be a comma list of numbers, got {part!r} in {text!r}") from None
        if not (0 <= v < float("inf")) or (percent and v <= 0):
            raise ValueError(f"{option} values must be finite and {'> 0' if percent else '>= 0'}, got {part!r}")
        vals.append(v)
    return sorted(set(vals))


def _reference(name: str | None, names, where: str, specs=None) -> str:
    """The reference LLM: `name`, checked against `names` (from `where`), or, when None, the most
    expensive of `specs` (price in + price out per token)."""
    if name is None:
        return max(specs, key=lambda sp: sp.price_in + sp.price_out).name
    if name not in names:
        raise ValueError(f"--reference {name!r} is not an LLM of {where}; its LLMs: {', '.join(names)}")
    return name


def cmd_run(args):
    """Train on the RouterBench slice's train split, evaluate on its test split: `train` then `eval`,
    each with its own defaults but for run's options."""
    ap, ref = build_parser(), "gpt-4-1106-preview"
    router_dir = cmd_train(ap.parse_args(["train", "--max-length", str(args.max_length), "--truncation",
                                          args.truncation, "--budget", args.budget, "--budget-reference", ref,
                                          "--out", str(args.router_out)]))
    cmd_eval(ap.parse_args(["eval", "--router", str(router_dir), "--reference", ref, "--out", str(args.report_out)]))


def cmd_ablation(args):
    from mixllm_jax.text import encoder
    from mixllm_jax.offline import pipeline

    train_ds = _load_data(args.data, args.models, "train")
    report = pipeline.ablation(args.kind, train_ds, _models(args.models), encoder.load_encoder(args.encoder),
                               Path(args.out), _reference(args.reference, train_ds.models, "the data", train_ds.specs),
                               router_config(args))
    print(f"\nablation '{args.kind}' on a validation part of train: best quality % of {report['reference']} "
          "at cost <= each level\n")
    print(report["cost_levels_table"])
    print(f"\nreport and plot in {args.out}")


def _experiment_data(args) -> dict:
    """The data options of `simulate` and `experiment` (--data, --models, --reference) as keywords."""
    if args.data is not None and not Path(args.data).is_dir() and args.models is None:
        raise ValueError("--models is required with a JSONL data file")
    return {"data_path": args.data, "models": args.models, "reference": args.reference}


def cmd_simulate(args):
    from mixllm_jax.sim import experiments

    report = experiments.simulate_main(
        out_dir=args.out, rate=args.rate, arrival=args.arrival, batch_s=args.batch_s,
        refresh_s=args.refresh_s, tolerance_s=args.tolerance, cost_weight=args.cost_weight,
        beta=args.beta, tau=args.tau, alpha=args.alpha, repeat=args.repeat, seed=args.seed,
        router_path=args.router, quick=args.quick, **_experiment_data(args))
    print(Path(report["paths"]["md"]).read_text())
    print(f"written: {', '.join(str(p) for p in report['paths'].values())}")


def cmd_experiment(args):
    from mixllm_jax.sim import experiments

    kw = {}
    if args.seeds:
        if args.name not in ("continual", "out-of-domain"):
            raise ValueError("--seeds goes with the continual and out-of-domain experiments")
        kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.splits:
        if args.name != "continual":
            raise ValueError("--splits goes with the continual experiment")
        kw["splits"], kw["extra_splits"] = tuple(float(s) for s in args.splits.split(",")), ()
    if args.modes:
        if args.name not in ("continual", "out-of-domain"):
            raise ValueError("--modes goes with the continual and out-of-domain experiments")
        kw["modes"] = tuple(args.modes.split(","))
    if args.no_held_out:
        if args.name != "out-of-domain":
            raise ValueError("--no-held-out goes with the out-of-domain experiment")
        kw["held_out_tasks"] = False
    if args.no_grow_domains:
        if args.name != "out-of-domain":
            raise SystemExit("--no-grow-domains goes with the out-of-domain experiment")
        kw["grow_domains"] = False
    report = experiments.run_experiment(args.name, args.out, quick=args.quick, **_experiment_data(args), **kw)
    print(Path(report["paths"]["md"]).read_text())
    print(f"written: {', '.join(str(p) for p in report['paths'].values())}")


def cmd_ope(args):
    """Off-policy estimates of a saved router's policy from a log with propensities."""
    from mixllm_jax.offline import ope
    from mixllm_jax.core.config import Budget

    router = _restore(args)
    policy = router.policy
    if args.cost_weight is not None:
        policy = router.policy_for(Budget("cost_weight", args.cost_weight)) if router.curve is not None \
            else policy.replace(cost_weight=args.cost_weight, mix=0.0)
    elif args.budget is not None:
        policy = router.policy_for(Budget.parse(args.budget))
    policy = policy.replace(explore=args.explore, alpha=args.alpha if args.alpha is not None else policy.alpha,
                            temperature=args.temperature, epsilon=args.epsilon, beta=0.0)
    log = ope.read_log(args.log)
    if log.x.shape[1] != router.state.dim:
        raise ValueError(f"the log's features have {log.x.shape[1]} dimensions, the router's {router.state.dim}: "
                         "a log is evaluated with the router (features) it was served with")
    out = ope.evaluate_router_on_log(log, router.state, router.registry, policy)
    print(f"{out['n']} logged decisions; target policy: cost weight {float(policy.cost_weight):.4g}, explore "
          f"{policy.explore}, temperature {float(policy.temperature):g}, epsilon {float(policy.epsilon):g}")
    print(f"mean probability the target gives the logged LLM: {out['target_prob_of_logged_mean']:.3f}\n")
    print(f"  {'estimator':10s} {'value':>8s} {'95% interval':>22s} {'s.e.':>8s} {'ESS':>8s}")
    for k in ("ips", "snips", "dr"):
        e = out[k]
        print(f"  {k.upper():10s} {e['value']:8.4f} [{e['low']:9.4f}, {e['high']:9.4f}] {e['se']:8.4f} {e['ess']:8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwritten: {args.out}")
    return out


def cmd_serve(args) -> None:
    from mixllm_jax.serve import app, options

    app.run(options.config_from_args(args), debug=args.debug)


def cmd_hash_key(args) -> None:
    """Print the SHA-256 of an API key read from stdin (or of a new key with --generate) as a
    keys-file entry."""
    from mixllm_jax.serve import auth

    if args.generate:
        key = auth.new_key()
        print(f"key (give it to the client; it is not stored anywhere): {key}")
    else:
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline()
        key = key.strip()
        if not key:
            raise ValueError("no key given on stdin")
    print(f"- name: {args.name}\n  sha256: {auth.hash_key(key)}\n  roles: [{', '.join(args.roles)}]")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 1000 else msg[:1000] + " ..."


def run_command(fn, debug: bool = False, prog: str = "mixllm-jax"):
    """Run `fn`; an error becomes one line on stderr and exit status 2 (with `debug`: raised, so the
    traceback shows). Ctrl-C exits 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 -- DataError, CheckpointError, ValueError, OSError, ...
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


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


def cmd_distill(args):
    from mixllm_jax.text import static_distill

    cfg = static_distill.distill(args.out, args.source, dims=args.dims, weighting=args.weighting,
                                 batch_size=args.batch_size)
    print(f"static encoder: {cfg['vocab_size']} tokens x {cfg['hidden_size']} dims "
          f"({100 * cfg['explained_variance']:.1f}% of the variance kept), {cfg['weighting']} weights, "
          f"distilled from {cfg['source']['name']} in {cfg['seconds']:.0f} s")
    print(f"saved to {args.out}; use it with --encoder static:{args.out}")


def cmd_route(args):
    from mixllm_jax.util import progress
    from mixllm_jax.core.config import Budget

    with progress.step("loading the router"):
        router = _restore(args)
    if args.cost_weight is not None:
        router.policy = router.policy_for(Budget("cost_weight", args.cost_weight))
    elif args.budget is not None:
        router.policy = router.policy_for(Budget.parse(args.budget))
    print(f"policy: cost weight {router.policy.cost_weight:.4g}"
          + (f", {100 * router.policy.mix:.1f}% at {router.policy.mix_cost_weight:.4g}" if router.policy.mix else ""))
    with progress.step(f"routing {len(args.prompts)} prompt(s) (the first call of a shape compiles)"):
        routes = router.route(args.prompts)
    for text, r in zip(args.prompts, routes):
        print(f"> {text[:100]!r}\n  chosen: {r.model}" + (f"   (nearest domain: {r.domain})" if r.domain else ""))
        print(f"  {'LLM':40s} {'quality':>8s} {'cost $':>10s} {'uncert.':>8s} {'penalty':>8s} {'score':>9s}")
        for m in sorted(r.score, key=r.score.get, reverse=True):
            print(f"  {m:40s} {r.quality[m]:8.3f} {r.cost[m]:10.6f} {r.uncertainty[m]:8.4f} "
                  f"{r.penalty[m]:8.3f} {r.score[m]:9.4f}")


def build_parser() -> argparse.ArgumentParser:
    """The `mixllm-jax` parser: one sub-command per job, every option with its help."""
    ap = argparse.ArgumentParser(prog="mixllm-jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (else one line, exit 2)")
    sub = ap.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument("--data", help="RouterBench folder or long-format JSONL (default: the shared RouterBench slice)")
        p.add_argument("--models", help="models file (prices per million tokens; default: RouterBench's models.json)")

    def config_args(p):
        from mixllm_jax.core.config import FEATURE_MODES

        p.add_argument("--encoder", default=None,
                       help="HF id or local folder (default all-MiniLM-L6-v2), or static:DIR for a static encoder "
                            "made by distill-encoder")
        p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
        p.add_argument("--truncation", choices=("left", "right"), default="left",
                       help="which end of a long prompt is cut (left keeps the question at the end)")
        p.add_argument("--epochs", type=int, default=300, help="tag-enhanced head training epochs")
        p.add_argument("--tag-weight", type=float, default=1.0, help="weight of the tag losses (0: regression only)")
        p.add_argument("--features", choices=FEATURE_MODES, default="raw+domain",
                       help="bandit features: embedding + nearest-domain one-hot (tag-enhanced), + soft domain "
                            "membership, the head's features, or the raw embedding")
        p.add_argument("--domains", type=int, default=None,
                       help="derive N domains by k-means of the embeddings (default: the data's tags; "
                            "20 k-means domains when it has none)")
        p.add_argument("--no-head", action="store_true", help="train no tag head; route on raw encoder embeddings")
        p.add_argument("--budget", default="25%",
                       help="operating point: mean cost per query as a share of the reference LLM's "
                            "(default 25%%), met on a held-out part of train with a mixture of two settings")
        p.add_argument("--budget-reference", default=None,
                       help="the LLM of --budget (default: the most expensive one)")
        p.add_argument("--budget-usd", type=float, default=None, help="operating point: mean USD per query")
        p.add_argument("--cost-weight", type=float, default=None, help="operating point: lambda (quality per USD)")
        p.add_argument("--finetune-encoder", action="store_true",
                       help="fine-tune the encoder on the training outcomes first (RouterDC-style contrastive "
                            "and regression losses; LoRA or the top layers; saved in the checkpoint)")
        p.add_argument("--finetune-method", choices=("lora", "top"), default="lora",
                       help="low-rank adapters on the top layers' matrices, or the top layers' weights")
        p.add_argument("--finetune-layers", type=int, default=1, help="how many top encoder layers are adapted")
        p.add_argument("--finetune-rank", type=int, default=8, help="LoRA rank")
        p.add_argument("--finetune-epochs", type=int, default=8,
                       help="most fine-tuning epochs (early stopping on a held-out 10%% of train)")
        p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default 1e-3)")

    p = sub.add_parser("train", help="train a router on logged outcomes and save it with its budget")
    data_args(p)
    config_args(p)
    p.add_argument("--out", default="checkpoints/router",
                   help="checkpoint directory; each train adds a numbered step (the last 3 are kept)")
    from mixllm_jax.offline import distributed# light: jax is imported when a command runs

    distributed.add_arguments(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved router and the baselines: table, report.json, plot")
    data_args(p)
    p.add_argument("--router", required=True, help="a checkpoint directory (see train --out)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--train-data", help="data the baselines are fitted on (default: --data's train split)")
    p.add_argument("--reference", default=None,
                   help="the LLM whose totals are 100%% (default: the data's most expensive LLM in the models file); "
                        "checked before any work")
    p.add_argument("--out", default="runs/eval", help="folder for report.json, report.md, curves.png")
    p.add_argument("--split", default="test", help="the split of --data evaluated on (e.g. ood)")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the router alone (no train split needed)")
    p.add_argument("--compare", metavar="CHECKPOINT",
                   help="another router (e.g. on another encoder) run on the same queries as method 'compare', "
                        "with the paired bootstrap of this router minus it")
    p.add_argument("--cost-weights", help="the lambda grid of the sweeps, a comma list (quality per USD), e.g. "
                                          "0,10,100,1000 (default: 0 and 161 values from 0.1 to 1e7)")
    p.add_argument("--budgets", help="budgets to read quality at, comma list of %% of the reference's cost, e.g. "
                                     "10,24.18,50: the table's columns, the router run at each budget "
                                     "(mixllm@budgets) and the budget table (default: 24.18)")
    p.add_argument("--full-report", action="store_true",
                   help="report.json with every per-task operating point (default: per-task AIQ and budgets only)")
    distributed.add_arguments(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", help="the main job: train on the RouterBench slice, evaluate on its test split")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
    p.add_argument("--truncation", choices=("left", "right"), default="left", help="which end of a long prompt is cut")
    p.add_argument("--budget", default="24.18%", help="operating point, share of GPT-4's cost (the paper's 24.18%%)")
    p.add_argument("--router-out", default="checkpoints/routerbench", help="where the router is saved")
    p.add_argument("--report-out", default="runs/routerbench", help="where the report goes")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("ablation", help="train variants of a config on part of train, compare them on the rest: "
                                        "features, domains, ridge, truncation or encoder fine-tuning")
    data_args(p)
    config_args(p)
    p.add_argument("kind", choices=("features", "domains", "ridge", "truncation", "finetune"),
                   help="what varies: bandit features, domains (tags vs k-means), ridge selection, truncation, encoder fine-tuning")
    p.add_argument("--reference", default=None,
                   help="the LLM whose totals are 100%% (default: the most expensive LLM of the data)")
    p.add_argument("--out", default=None, help="report folder (default runs/ablation-KIND)")
    p.set_defaults(fn=cmd_ablation)

    p = sub.add_parser("route", help="route prompts with a saved router and explain each decision")
    p.add_argument("--router", required=True, help="a checkpoint directory (see train --out)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--cost-weight", type=float, help="override lambda (quality per USD)")
    p.add_argument("--budget", help="override the operating point: share of the most expensive LLM's cost, e.g. 30%%")
    p.add_argument("prompts", nargs="+", help="the prompts to route")
    p.set_defaults(fn=cmd_route)

    def experiment_data_args(p):  # simulate, experiment: train / test (/ ood) splits of any log
        data_args(p)
        p.add_argument("--reference", default=None,
                       help="the LLM whose logged totals are 100%% (default gpt-4-1106-preview)")

    p = sub.add_parser("simulate", help="stream the test split through a router under load (latency model; "
                                        "RouterBench latency profiles are assumptions)")
    experiment_data_args(p)
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
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process and random baselines")
    p.add_argument("--quick", action="store_true", help="a small subset on one-hot task features (seconds)")
    p.add_argument("--out", default="runs/simulate", help="folder for simulate.json/.md/.png")
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("experiment", help="reproduce a paper experiment: latency, continual, llm-changes, out-of-domain; "
                                          "or check off-policy evaluation against the truth (ope)")
    p.add_argument("name", choices=("latency", "continual", "llm-changes", "out-of-domain", "ope"),
                   help="the experiment to run")
    experiment_data_args(p)
    p.add_argument("--quick", action="store_true", help="a small subset on one-hot task features (seconds)")
    p.add_argument("--out", default="runs/experiments", help="folder for NAME.json/.md/.png")
    p.add_argument("--seeds", help="continual, out-of-domain (its ood split): comma-separated seeds (default 0,1,2)")
    p.add_argument("--splits", help="continual: comma-separated offline fractions, no supplementary ones "
                                    "(default 0.8,0.5,0.3 plus 0.1,0.05)")
    p.add_argument("--modes", help="continual, out-of-domain: comma-separated online modes among none, refined, "
                                   "binary, refined_greedy, refined_thompson")
    p.add_argument("--no-held-out", action="store_true",
                   help="out-of-domain: only the data's ood split (no held-out-task streams)")
    p.add_argument("--no-grow-domains", action="store_true",
                   help="out-of-domain: no domains opened online (queries keep their nearest trained domain)")
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("ope", help="off-policy evaluation: estimate a saved router's value from a log of decisions "
                                   "with propensities (IPS, SNIPS, doubly robust, 95%% intervals)")
    p.add_argument("--log", required=True, help="a decision log (JSONL: x, model, reward, propensity; see ope.write_log) "
                                               "or a server --log-dir folder (requests/ and journal/)")
    p.add_argument("--router", required=True, help="a checkpoint directory: the target policy's router")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--cost-weight", type=float, help="evaluate the router at this lambda (quality per USD)")
    p.add_argument("--budget", help="evaluate the router at this budget, share of the most expensive LLM's cost, e.g. 30%%")
    p.add_argument("--explore", choices=("greedy", "ucb", "thompson"), default="greedy",
                   help="the target's exploration (default greedy: no bonus)")
    p.add_argument("--alpha", type=float, default=None, help="exploration weight in posterior s.d.s (ucb, thompson)")
    p.add_argument("--temperature", type=float, default=0.0, help="the target's softmax temperature (0: deterministic)")
    p.add_argument("--epsilon", type=float, default=0.0, help="the target's share of uniformly random LLMs")
    p.add_argument("--out", help="also write the estimates as JSON here")
    p.set_defaults(fn=cmd_ope)

    p = sub.add_parser("serve", help="HTTP router: /v1/route, OpenAI-compatible /v1/chat/completions proxy, "
                                     "feedback, live LLM add/remove, /metrics")
    from mixllm_jax.serve import options  # light: the web stack is imported when the server starts

    options.add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("hash-key", help="the SHA-256 of an API key (read from stdin) as a serve --api-keys entry")
    p.add_argument("--generate", action="store_true", help="make a new random key and print it with its hash")
    p.add_argument("--name", default="client", help="the entry's name (default: client)")
    p.add_argument("--roles", nargs="+", default=["route", "feedback"], choices=("route", "feedback", "admin"),
                   help="the entry's roles (default: route feedback)")
    p.set_defaults(fn=cmd_hash_key)

    p = sub.add_parser("distill-encoder", help="distil a static encoder (per-token vectors, Model2Vec's method) "
                                               "from the installed MiniLM: minutes on CPU")
    p.add_argument("--out", required=True, help="folder for model.safetensors, config.json and the tokenizer")
    p.add_argument("--source", default=None, help="the transformer distilled (default all-MiniLM-L6-v2)")
    p.add_argument("--dims", type=int, default=256, help="PCA dimensions kept (default 256)")
    p.add_argument("--weighting", choices=("zipf", "sif", "none"), default="zipf",
                   help="token weights by vocabulary rank: log(1 + rank) (zipf, default), SIF, or none")
    p.add_argument("--batch-size", type=int, default=512, help="tokens per transformer call")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("bench", add_help=False,
                       help="throughput suite: route/update/text-to-decision rates, peers side by side "
                            "(options: mixllm-jax bench --help)")
    p.set_defaults(fn=cmd_bench)

    return ap


def main(argv=None):
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "kind", None) and args.out is None:
        args.out = f"runs/ablation-{args.kind}"
    if args.command in COMPILATION_CACHED:
        from mixllm_jax.text.cache import enable_compilation_cache

        enable_compilation_cache()
    return run_command(lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    main()

"""The offline commands: train and eval (and ablation), from logged outcomes to a router and its report."""

from __future__ import annotations

from pathlib import Path


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
    from mixllm_jax.offline import report as report_mod
    from mixllm_jax.util import progress

    with progress.step("writing the report and plots"):
        files = report_mod.write_report(report, out, full=full)
    print(f"\n{title} ({report['n_queries']} test queries, % of {report['reference']})\n")
    print(report_mod.format_table(report))
    if "budgets" in report:
        print("\nbudgets met on the router's held-out curve (realised on these queries):\n")
        print(report_mod.format_budget_table(report["budgets"]))
    if report.get("bootstrap"):
        print("\npaired bootstrap over the test queries (95% intervals):\n")
        print(report_mod.format_bootstrap_table(report["bootstrap"]))
    if "calibration" in report:
        print(f"\ncalibration of predicted quality: ECE {report['calibration']['ece']:.4f}")
    print("\nper task:\n" + report_mod.format_task_table(report))
    print(f"\nreport: {files['json']}\ntable:  {files['md']}\nplot:   {files['png']}")


def restore(args):
    """The router of --router (and --step)."""
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
        router = restore(args)
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

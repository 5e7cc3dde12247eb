"""The simulation commands: simulate (a query stream under load) and experiment (the paper's experiments, OPE)."""

from __future__ import annotations

from pathlib import Path


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
            raise ValueError("--no-grow-domains goes with the out-of-domain experiment")
        kw["grow_domains"] = False
    report = experiments.run_experiment(args.name, args.out, quick=args.quick, **_experiment_data(args), **kw)
    print(Path(report["paths"]["md"]).read_text())
    print(f"written: {', '.join(str(p) for p in report['paths'].values())}")

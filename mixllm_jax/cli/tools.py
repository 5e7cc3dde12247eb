"""The repository's tools: bench (the throughput suite in benchmarks/) and distill-encoder (the static encoder tier)."""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_bench(args, rest):
    """The throughput suite (benchmarks/ in the repository): `mixllm-jax bench --help` lists its options."""
    root = Path(__file__).resolve().parents[2]  # the checkout (this file: mixllm_jax/cli/tools.py)
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

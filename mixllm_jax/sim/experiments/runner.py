"""`run_experiment(NAME, ...)`: one experiment by its command-line name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mixllm_jax.sim.experiments.common import EXPERIMENTS, ExperimentData, load_data
from mixllm_jax.sim.experiments.continual import run_continual
from mixllm_jax.sim.experiments.latency import run_latency
from mixllm_jax.sim.experiments.llm_changes import run_llm_changes
from mixllm_jax.sim.experiments.ope_check import run_ope
from mixllm_jax.sim.experiments.out_of_domain import run_ood


def run_experiment(name: str, out_dir: str | Path = "runs/experiments", quick: bool = False,
                   data: ExperimentData | None = None, progress: bool = True, *, data_path: str | Path | None = None,
                   models: str | Path | None = None, reference: str | None = None, **kwargs) -> dict:
    """`mixllm-jax experiment NAME`: run one of EXPERIMENTS, writing NAME.json, NAME.md and NAME.png
    into out_dir. quick: a small random subset on one-hot task features (seconds). The data: the
    RouterBench slice, or `data_path` (a RouterBench folder, or a JSONL file with its `models` file;
    see load_data), or `data` (already loaded); `reference`: the LLM whose logged totals are 100%
    (default gpt-4-1106-preview). kwargs go to the experiment's function (run_latency,
    run_continual, run_llm_changes, run_ood, run_ope). Returns the report dict (report["paths"] lists the files)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if data is not None and (data_path is not None or models is not None):
        raise ValueError("give either data (loaded) or data_path / models, not both")
    if data is None:
        d = load_data(quick, data_path=data_path, models=models, reference=reference, progress=progress)
    else:
        d = data if reference is None else dataclasses.replace(data, reference=reference)
    kwargs.setdefault("progress", progress)  # bars show only on a terminal (progress.py)
    fn = {"latency": run_latency, "continual": run_continual, "llm-changes": run_llm_changes,
          "out-of-domain": run_ood, "ope": run_ope}[name]
    if quick and name == "latency":
        kwargs.setdefault("repeat", 2)
        kwargs.setdefault("rates", (10.0, 40.0))
    if quick and name in ("continual", "out-of-domain"):
        kwargs.setdefault("seeds", (0,))
    if quick and name == "continual":
        kwargs.setdefault("extra_splits", ())
    return fn(d, out_dir, **kwargs)

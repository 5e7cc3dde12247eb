"""The paper's deployment experiments, each one command writing NAME.json, NAME.md and NAME.png.

    run_experiment("latency", out_dir)        routing under load: penalty vs none vs baselines
    run_experiment("continual", out_dir)      offline:online 80:20 / 50:50 / 30:70, no / refined / binary
    run_experiment("llm-changes", out_dir)    LLMs added, removed and repriced while the stream runs
    run_experiment("out-of-domain", out_dir)  hold a task out (RouterBench: train on two, stream the
                                              third); with an `ood` split, also stream its tasks
    run_experiment("ope", out_dir)            off-policy estimates (IPS, SNIPS, DR) of three policies from
                                              a logged stream, against their true values

`simulate_main(...)` is one latency run at one load (the `mixllm-jax simulate` command).
Everything is on the RouterBench slice by default (train split to train and stream, test split to
evaluate), with cached encoder embeddings (max_length 128, left truncation) and the tag-enhanced
features; `quick=True` runs a small subset on one-hot task features (no encoder: seconds, for tests).
Any JSONL log in the project's format with `train` and `test` splits (and optionally `ood`) works
too (`data_path=`, `models=`; `--data`, `--models` on the command line), as does another reference
LLM (`reference=`, `--reference`; default gpt-4-1106-preview).

Protocols (the paper's Table 1 setup is described only briefly; these are our choices):
* A router's operating point is a cost weight lambda, calibrated on its own offline training data
  to the paper's 24.18% of the reference's cost (the smallest lambda of `evaluate.COST_WEIGHTS` at or
  under it), unless given; 0 on cost-blind data (every LLM costs the same on every query).
* "Quality at equal or lower cost": on the test split, every method's lambda sweep (no load) gives
  achieved points; a method's quality is its best achieved quality at cost <= a shared cap (the
  no-online router's cost at its lambda for `continual`; the in-domain router's for
  `out-of-domain`), so no variant wins by spending more.
* Streams arrive at 10 queries/s (the paper's 100 per 10 s) unless said otherwise; latency profiles
  of RouterBench's LLMs are ASSUMPTIONS (see `simulate.LATENCY_NOTE`), stated in every output.

Modules: `common` (data and features, the offline router, the stream policy, sweeps, writing
results), `plots` (the figures), one module per experiment (`latency` with `simulate_main`,
`continual`, `llm_changes`, `out_of_domain`) and `runner` (`run_experiment`).
"""

from mixllm_jax.sim.experiments.common import (BUDGET_PCT, EXPERIMENTS, PAPER_OOD, PAPER_TABLE1, REFERENCE, STREAM_ALPHA,
                                           STREAM_BETA, STREAM_TAU, ExperimentData, band_quality, cost_blind, hull_at,
                                           load_data, load_splits, onehot_features, select_models)
from mixllm_jax.sim.experiments.continual import run_continual
from mixllm_jax.sim.experiments.latency import run_latency, simulate_main
from mixllm_jax.sim.experiments.llm_changes import DEFAULT_ADDED, DEFAULT_REMOVED, default_changes, run_llm_changes
from mixllm_jax.sim.experiments.ope_check import run_ope
from mixllm_jax.sim.experiments.out_of_domain import run_ood
from mixllm_jax.sim.experiments.runner import run_experiment

__all__ = [
    "EXPERIMENTS", "REFERENCE", "BUDGET_PCT", "PAPER_TABLE1", "PAPER_OOD", "STREAM_BETA", "STREAM_TAU", "STREAM_ALPHA",
    "ExperimentData", "load_data", "load_splits", "onehot_features", "select_models", "cost_blind", "hull_at",
    "band_quality", "run_latency", "simulate_main", "run_continual", "DEFAULT_ADDED", "DEFAULT_REMOVED",
    "default_changes", "run_llm_changes", "run_ood", "run_ope",
    "run_experiment",
]

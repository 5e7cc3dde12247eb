"""Datasets of logged routing outcomes: RouterBench's wide CSVs and a long JSONL format.

    dataset.py      Dataset (one row per query, one column per LLM; fields and shapes there),
                    ModelSpec and the models file (load_models), DataError, split helpers
    routerbench.py  load_routerbench (the wide CSVs, their known defects) and recover_tokens
    jsonl.py        load_jsonl / write_jsonl (one line per (query, LLM) outcome)

Everything public is re-exported here: ``from mixllm_jax.data import Dataset, load_jsonl``.
"""

from mixllm_jax.data.dataset import (CHARS_PER_TOKEN, DataError, Dataset, ModelSpec, load_models,
                                     split_offline_online)
from mixllm_jax.data.jsonl import load_jsonl, write_jsonl
from mixllm_jax.data.routerbench import load_routerbench, recover_tokens, routerbench_dir

__all__ = [
    "DataError",
    "ModelSpec",
    "load_models",
    "Dataset",
    "routerbench_dir",
    "load_routerbench",
    "recover_tokens",
    "load_jsonl",
    "write_jsonl",
    "split_offline_online",
    "CHARS_PER_TOKEN",
]

"""Datasets of logged routing outcomes: RouterBench's wide CSVs and a long JSONL format.

A :class:`Dataset` holds one row per query and one column per LLM (``N`` queries, ``M`` models):

=====================  ==========  ======================================================
field                  shape       meaning
=====================  ==========  ======================================================
``query_ids``          [N] str     unique id of each query
``prompts``            [N] str     the prompt text
``tags``               [N] tuple   domain tags (RouterBench: the task, e.g. ``arc-challenge``)
``models``             [M] str     LLM names, the column order of every [N, M] array
``quality``            [N, M] f32  observed quality in [0, 1]; NaN where not observed
``cost``               [N, M] f32  USD of that call; NaN where not observed
``prompt_tokens``      [N] f32     prompt length in tokens
``completion_tokens``  [N, M] f32  length of each LLM's answer in tokens; NaN where unknown
``split``              [N] str     e.g. ``train`` / ``test``
``latency_s``          [N, M] f32  observed end-to-end latency, or None (RouterBench has none)
``specs``              [M]         the :class:`ModelSpec` of each column (prices, latency profile)
``report``             dict        what the loader found and did (defects, drops, estimates)
=====================  ==========  ======================================================

Loaders never fix or drop data silently: everything they drop or estimate is counted in
``Dataset.report``, and bad input raises :class:`DataError` (a ``ValueError``) naming the file,
the line or row, the field and the value.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mixllm_jax.paths import shared_dir

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

CHARS_PER_TOKEN = 4.0
"""Rule-of-thumb characters per token, used only where a token count must be estimated (and reported)."""


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``FILE:LINE: field 'F': message (value V)``."""

    def __init__(self, path: Any, line: Any, field: str | None, message: str, value: Any = None):
        self.path, self.line, self.field, self.value = str(path), line, field, value
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f" field '{field}':" if field else ""
        val = f" (value {value!r})" if value is not None else ""
        super().__init__(f"{where}:{what} {message}{val}")


# ----------------------------------------------------------------------------------------------
# Models file
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One LLM: prices in USD per million tokens and an (optional, assumed) latency profile."""

    name: str
    price_in_per_mtok: float
    price_out_per_mtok: float
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    max_concurrency: int | None = None

    @property
    def price_in(self) -> float:
        """USD per prompt token."""
        return self.price_in_per_mtok * 1e-6

    @property
    def price_out(self) -> float:
        """USD per completion token."""
        return self.price_out_per_mtok * 1e-6


_SPEC_REQUIRED = ("name", "price_in_per_mtok", "price_out_per_mtok")
_SPEC_OPTIONAL = ("ttft_s", "tokens_per_s", "max_concurrency")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_models(path: str | Path) -> list[ModelSpec]:
    """Read a models file: ``{"models": [{"name", "price_in_per_mtok", "price_out_per_mtok",
    "ttft_s"?, "tokens_per_s"?, "max_concurrency"?}, ...]}`` (a bare list is accepted too).

    Raises :class:`DataError` naming the file, the model and the field for a missing field, a
    negative or non-finite price, a non-positive latency figure, an unknown key or a duplicate name.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise DataError(path, None, None, f"not valid JSON: {e}") from None
    entries = raw.get("models") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise DataError(path, None, "models", "expected a non-empty list of models")
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        label = f"model #{i}"
        if not isinstance(e, dict):
            raise DataError(path, None, label, "each model must be a JSON object", e)
        name = e.get("name")
        if isinstance(name, str) and name:
            label = f"model '{name}'"
        for key in _SPEC_REQUIRED:
            if key not in e:
                raise DataError(path, None, key, f"{label}: missing required field")
        unknown = sorted(set(e) - set(_SPEC_REQUIRED) - set(_SPEC_OPTIONAL))
        if unknown:
            raise DataError(path, None, unknown[0], f"{label}: unknown field (allowed: "
                            f"{', '.join(_SPEC_REQUIRED + _SPEC_OPTIONAL)})")
        if not isinstance(name, str) or not name:
            raise DataError(path, None, "name", f"{label}: must be a non-empty string", name)
        if name in seen:
            raise DataError(path, None, "name", "duplicate model name", name)
        seen.add(name)
        for key in ("price_in_per_mtok", "price_out_per_mtok"):
            v = e[key]
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise DataError(path, None, key, f"{label}: must be a finite number >= 0", v)
        for key in _SPEC_OPTIONAL:
            v = e.get(key)
            if v is not None and (not _is_number(v) or not math.isfinite(v) or v <= 0
                                  or (key == "max_concurrency" and v != int(v))):
                raise DataError(path, None, key, f"{label}: must be a positive "
                                f"{'integer' if key == 'max_concurrency' else 'number'} or absent", v)
        specs.append(ModelSpec(
            name=name,
            price_in_per_mtok=float(e["price_in_per_mtok"]),
            price_out_per_mtok=float(e["price_out_per_mtok"]),
            ttft_s=None if e.get("ttft_s") is None else float(e["ttft_s"]),
            tokens_per_s=None if e.get("tokens_per_s") is None else float(e["tokens_per_s"]),
            max_concurrency=None if e.get("max_concurrency") is None else int(e["max_concurrency"]),
        ))
    return specs


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """Logged outcomes, one row per query and one column per LLM (see the module docstring)."""

    query_ids: list[str]
    prompts: list[str]
    tags: list[tuple[str, ...]]
    models: list[str]
    quality: np.ndarray  # [N, M] float32, NaN = not observed
    cost: np.ndarray  # [N, M] float32 USD
    prompt_tokens: np.ndarray  # [N] float32
    completion_tokens: np.ndarray  # [N, M] float32
    split: list[str]
    latency_s: np.ndarray | None = None  # [N, M] float32 or None
    specs: list[ModelSpec] | None = None  # [M], same order as models
    report: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n, m = len(self.query_ids), len(self.models)
        self.quality = np.asarray(self.quality, np.float32).reshape(n, m)
        self.cost = np.asarray(self.cost, np.float32).reshape(n, m)
        self.prompt_tokens = np.asarray(self.prompt_tokens, np.float32).reshape(n)
        self.completion_tokens = np.asarray(self.completion_tokens, np.float32).reshape(n, m)
        if self.latency_s is not None:
            self.latency_s = np.asarray(self.latency_s, np.float32).reshape(n, m)
        for name in ("prompts", "tags", "split"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Dataset.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.specs is not None and [s.name for s in self.specs] != list(self.models):
            raise ValueError("Dataset.specs must list the same models in the same order as Dataset.models")

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def price_in(self) -> np.ndarray:
        """[M] float32 USD per prompt token (needs ``specs``)."""
        return np.array([s.price_in for s in self._need_specs()], np.float32)

    @property
    def price_out(self) -> np.ndarray:
        """[M] float32 USD per completion token (needs ``specs``)."""
        return np.array([s.price_out for s in self._need_specs()], np.float32)

    def _need_specs(self) -> list[ModelSpec]:
        if self.specs is None:
            raise ValueError("this Dataset carries no model specs (prices)")
        return self.specs

    def select(self, idx) -> "Dataset":
        """Rows ``idx`` (int array, bool mask [N] or slice) as a new Dataset; ``report`` is kept."""
        rows = np.arange(len(self))[idx]
        rows = np.atleast_1d(rows)
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return Dataset(
            query_ids=pick(self.query_ids), prompts=pick(self.prompts), tags=pick(self.tags),
            models=list(self.models), quality=self.quality[rows], cost=self.cost[rows],
            prompt_tokens=self.prompt_tokens[rows], completion_tokens=self.completion_tokens[rows],
            split=pick(self.split), latency_s=None if self.latency_s is None else self.latency_s[rows],
            specs=self.specs, report=self.report,
        )

    def by_split(self) -> dict[str, "Dataset"]:
        """``{split name: Dataset}``, splits in order of first appearance."""
        names = list(dict.fromkeys(self.split))
        arr = np.asarray(self.split, dtype=object)
        return {s: self.select(arr == s) for s in names}


# ----------------------------------------------------------------------------------------------
# Token recovery (RouterBench)
# ----------------------------------------------------------------------------------------------


def recover_tokens(
    cost: np.ndarray,
    price_in: np.ndarray,
    price_out: np.ndarray,
    responses: Sequence[Sequence[str]] | None = None,
    prompt_chars: np.ndarray | None = None,
    chars_per_token: float = CHARS_PER_TOKEN,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recover prompt and completion token counts from recorded costs.

    Model: ``cost[i, m] = p[i] * price_in[m] + n[i, m] * price_out[m]`` with one tokenizer for all
    models, so the prompt count ``p[i]`` is shared and ``n[i, m]`` is each model's answer length.
    That is M equations in M + 1 unknowns per query; one more equation pins it down:

    1. Exact: two models ``a, b`` whose responses are the *same text* have the same ``n``; if
       their price ratios ``price_out / price_in`` differ, the 2x2 system gives ``p`` and ``n``
       exactly. All such pairs of a query must agree (majority vote otherwise).
    2. Fallback (no such pair, e.g. code answers): ``p`` is estimated as
       ``prompt_chars / chars_per_token`` and moved to the nearest integer for which every
       ``n[i, m]`` is a non-negative integer (the prices make ``p`` unique modulo a small lattice,
       6 tokens on RouterBench), and the row is flagged not exact.

    Given ``p``, ``n[i, m] = (cost[i, m] - p[i] * price_in[m]) / price_out[m]``, so recomputing the
    cost from the tokens reproduces the recorded cost (up to float rounding) in both cases.

    On the RouterBench slice (README of ../shared/data/routerbench): every recorded cost divided by
    the input price is an integer (to 1e-12); all 2,751 ARC-Challenge and Winogrande rows but one
    have an identical-answer pair with different ratios (e.g. gpt-4 and gpt-3.5 both answering
    "B"), all pairs of a row give the same ``p``, and the recovered ``p`` and every ``n`` are
    integers (so the shared-tokenizer model fits these rows exactly). No MBPP row
    has one (code answers differ), so MBPP prompt counts are estimates: tried on the exact rows,
    the fallback hits the true ``p`` on 99.8% of Winogrande and 70% of ARC rows, otherwise off by a
    multiple of 6 tokens. Prompts recorded as a list of several strings (14 defective ARC rows)
    count all of them.

    Args:
      cost: [N, M] USD (NaN not allowed).
      price_in, price_out: [M] USD per token, price_in > 0.
      responses: optional N rows of M response strings (compared verbatim).
      prompt_chars: optional [N] characters of the prompt, for the fallback (else p = 0 there).
    Returns:
      prompt_tokens [N] float64, completion_tokens [N, M] float64 (NaN where price_out == 0),
      exact [N] bool.
    """
    cost = np.asarray(cost, np.float64)
    pin = np.asarray(price_in, np.float64)
    pout = np.asarray(price_out, np.float64)
    n_rows, n_models = cost.shape
    if np.any(pin <= 0):
        raise ValueError("recover_tokens needs price_in > 0 for every model")
    if not np.all(np.isfinite(cost)):
        raise ValueError("recover_tokens: cost contains NaN or inf")
    k = cost / pin  # [N, M] cost in units of prompt tokens: p + ratio * n
    ratio = pout / pin  # [M]
    p = np.zeros(n_rows)
    exact = np.zeros(n_rows, bool)
    tol = 1e-6
    for i in range(n_rows):
        if responses is not None:
            resp = responses[i]
            sols = []
            for a in range(n_models):
                for b in range(a + 1, n_models):
                    if ratio[a] != ratio[b] and resp[a] == resp[b]:
                        n_ab = (k[i, a] - k[i, b]) / (ratio[a] - ratio[b])
                        sols.append(k[i, a] - ratio[a] * n_ab)
            if sols:
                votes = Counter(round(s, 3) for s in sols)
                p_i = float(np.median([s for s in sols if round(s, 3) == votes.most_common(1)[0][0]]))
                if abs(p_i - round(p_i)) < tol * max(1.0, abs(p_i)):
                    p_i = float(round(p_i))
                n_i = (k[i] - p_i) / np.where(ratio > 0, ratio, np.nan)
                ok = np.isnan(n_i) | ((n_i > -tol) & (np.abs(n_i - np.round(n_i)) < tol * np.maximum(1, n_i)))
                if np.all(ok):
                    p[i], exact[i] = p_i, True
                    continue
        # fallback: estimate, then snap to the integer lattice with n >= 0
        est = 0.0 if prompt_chars is None else float(prompt_chars[i]) / chars_per_token
        p_max = float(np.floor(k[i].min() + tol))
        p[i] = _snap_prompt_tokens(k[i], ratio, est, p_max, tol)
    n = (cost - p[:, None] * pin) / np.where(pout > 0, pout, np.nan)
    n = np.where(np.abs(n - np.round(n)) < tol * np.maximum(1, np.abs(n)), np.round(n), n)
    return p, n, exact


def _snap_prompt_tokens(k: np.ndarray, ratio: np.ndarray, est: float, p_max: float, tol: float,
                        search: int = 4096) -> float:
    """Integer p closest to ``est`` in [0, p_max] making every (k - p) / ratio an integer."""
    if p_max < 0:
        return 0.0
    centre = int(round(min(max(est, 0.0), p_max)))
    pos = ratio > 0
    for d in range(search):
        for cand in ((centre,) if d == 0 else (centre - d, centre + d)):
            if 0 <= cand <= p_max:
                n = (k[pos] - cand) / ratio[pos]
                if np.all(np.abs(n - np.round(n)) < tol * np.maximum(1, n)):
                    return float(cand)
    return float(min(max(est, 0.0), p_max))


# ----------------------------------------------------------------------------------------------
# RouterBench wide CSVs
# ----------------------------------------------------------------------------------------------


def routerbench_dir() -> Path:
    """``<shared>/data/routerbench`` (``MIXLLM_SHARED`` overrides the shared folder)."""
    return Path(shared_dir()) / "data" / "routerbench"


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="", encoding="utf-8") if path.suffix == ".gz" else \
        open(path, newline="", encoding="utf-8")


def _read_routerbench_csv(path: Path, models: list[str]) -> list[dict]:
    """Parse one wide CSV into rows {sample_id, eval_name, prompt_list, quality [M], cost [M], responses [M]}."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        need = ["sample_id", "prompt", "eval_name"] + [c for m in models
                                                       for c in (m, f"{m}|total_cost", f"{m}|model_response")]
        missing = [c for c in need if c not in header]
        if missing:
            raise DataError(path, 1, missing[0], "column missing from the CSV header")
        end = reader.line_num  # the header's last line
        for rec in reader:
            start, end = end + 1, reader.line_num  # a record may span several lines
            where = (path, f"line {start} (sample_id {rec.get('sample_id')!r})")
            try:
                prompt = ast.literal_eval(rec["prompt"])
            except (ValueError, SyntaxError):
                raise DataError(*where, "prompt", "not a Python-literal list of strings",
                                rec["prompt"][:80]) from None
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, list) or not prompt or not all(isinstance(s, str) for s in prompt):
                raise DataError(*where, "prompt", "expected a non-empty list of strings", rec["prompt"][:80])
            q = np.full(len(models), np.nan)
            c = np.full(len(models), np.nan)
            for j, m in enumerate(models):
                sq, sc = rec[m].strip(), rec[f"{m}|total_cost"].strip()
                if sq:
                    try:
                        q[j] = float(sq)
                    except ValueError:
                        raise DataError(*where, m, "quality is not a number", sq) from None
                    if not 0.0 <= q[j] <= 1.0:
                        raise DataError(*where, m, "quality outside [0, 1]", sq)
                try:
                    c[j] = float(sc)
                except ValueError:
                    raise DataError(*where, f"{m}|total_cost", "cost is not a number", sc) from None
                if not math.isfinite(c[j]) or c[j] < 0:
                    raise DataError(*where, f"{m}|total_cost", "cost must be finite and >= 0", sc)
            rows.append({
                "sample_id": rec["sample_id"], "eval_name": rec["eval_name"], "prompt_list": prompt,
                "quality": q, "cost": c, "responses": [rec[f"{m}|model_response"] for m in models],
                "line": start,
            })
    return rows


def _task_files(root: Path, split: str, tasks: Iterable[str] | None) -> list[tuple[str, Path]]:
    if tasks is None:
        found = sorted(root.glob(f"*_{split}.csv.gz")) or sorted(root.glob(f"*_{split}.csv"))
        if not found:
            raise FileNotFoundError(f"no RouterBench files *_{split}.csv[.gz] in {root}")
        return [(p.name.split(f"_{split}.csv")[0], p) for p in found]
    out = []
    for t in tasks:
        stem = t.replace("-", "_")
        for ext in (".csv.gz", ".csv"):
            p = root / f"{stem}_{split}{ext}"
            if p.exists():
                out.append((stem, p))
                break
        else:
            raise FileNotFoundError(f"RouterBench task {t!r}: no {stem}_{split}.csv[.gz] in {root}")
    return out


def load_routerbench(
    dir: str | Path | None = None,
    split: str = "train",
    tasks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    on_defect: str = "drop",
    missing: str = "drop",
) -> Dataset:
    """Load one split of RouterBench's wide CSVs (``<task>_<split>.csv.gz``) into a Dataset.

    Args:
      dir: folder with the CSVs and ``models.json`` (default :func:`routerbench_dir`).
      split: ``"train"`` or ``"test"``.
      tasks: file stems or task names (``arc_challenge`` / ``arc-challenge``); default all found.
      models: model names (columns, in this order); default all of ``models.json`` in its order.
      on_defect: ``"drop"`` handles the known defects below and reports them; ``"error"`` raises a
        :class:`DataError` at the first one.
      missing: ``"drop"`` (default) drops rows with any empty score among ``models``; ``"keep"``
        keeps them with NaN in ``quality`` (costs and tokens are always present).

    Defects handled, in this order, each counted per task in ``report["tasks"][task]``:
      1. duplicated ``sample_id`` within the split: keep the row with the fewest empty scores
         (the first among equals). On this slice each duplicate is a pair of complementary half
         rows: one scored only by gpt-3.5, with a doubled prompt list; the other scored by all the
         others. ARC train has 7, ARC test 1.
      2. ids present in both splits are dropped from train (ARC: 6); loading test only lists them
         in ``ids_also_in_train``.
      3. empty scores (ARC: 20 rows in train, 8 in test before steps 1-2), per ``missing``.

    ``prompts`` is the last element of the recorded prompt list; ``tags`` is ``(eval_name,)``;
    tokens come from :func:`recover_tokens` (``report["tokens"]`` says how many rows are exact).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if on_defect not in ("drop", "error"):
        raise ValueError(f"on_defect must be 'drop' or 'error', got {on_defect!r}")
    if missing not in ("drop", "keep"):
        raise ValueError(f"missing must be 'drop' or 'keep', got {missing!r}")
    root = Path(dir) if dir is not None else routerbench_dir()
    all_specs = load_models(root / "models.json")
    by_name = {s.name: s for s in all_specs}
    if models is None:
        specs = all_specs
    else:
        unknown = [m for m in models if m not in by_name]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; models.json has: {', '.join(by_name)}")
        if len(set(models)) != len(models):
            raise ValueError(f"duplicate model names in models={list(models)!r}")
        specs = [by_name[m] for m in models]
    names = [s.name for s in specs]

    report: dict[str, Any] = {"source": str(root), "split": split, "missing_policy": missing,
                              "tasks": {}}
    kept: list[dict] = []
    for task, path in _task_files(root, split, tasks):
        rows = _read_routerbench_csv(path, names)
        rep: dict[str, Any] = {"file": path.name, "rows_read": len(rows)}
        n_missing_raw = sum(bool(np.isnan(r["quality"]).any()) for r in rows)
        rep["rows_with_empty_score_read"] = n_missing_raw
        # 1. duplicates
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(r["sample_id"], []).append(r)
        dups = [sid for sid, g in groups.items() if len(g) > 1]
        if dups and on_defect == "error":
            g = groups[dups[0]]
            raise DataError(path, f"lines {[r['line'] for r in g]}", "sample_id",
                            f"duplicated id ({len(dups)} duplicated ids in this file)", dups[0])
        deduped = []
        for sid, g in groups.items():
            deduped.append(min(g, key=lambda r: int(np.isnan(r["quality"]).sum())))  # first among ties
        rep["duplicate_ids"] = dups
        rep["duplicate_rows_dropped"] = len(rows) - len(deduped)
        rows = deduped
        # 2. train/test overlap
        if split == "train":
            test_path = path.with_name(path.name.replace("_train.", "_test."))
            test_ids = set(_read_ids(test_path)) if test_path.exists() else set()
            rep["test_file_found"] = test_path.exists()
            overlap = [r["sample_id"] for r in rows if r["sample_id"] in test_ids]
            if overlap and on_defect == "error":
                raise DataError(path, None, "sample_id",
                                f"{len(overlap)} ids of train also appear in test", overlap[0])
            rows = [r for r in rows if r["sample_id"] not in test_ids]
            rep["ids_also_in_test"] = overlap
            rep["overlap_rows_dropped"] = len(overlap)
        else:  # reported only: the test split is left whole
            train_path = path.with_name(path.name.replace("_test.", "_train."))
            train_ids = set(_read_ids(train_path)) if train_path.exists() else set()
            rep["ids_also_in_train"] = [r["sample_id"] for r in rows if r["sample_id"] in train_ids]
        # 3. empty scores
        miss = [r for r in rows if np.isnan(r["quality"]).any()]
        if miss and on_defect == "error":
            j = int(np.flatnonzero(np.isnan(miss[0]["quality"]))[0])
            raise DataError(path, f"line {miss[0]['line']}", names[j],
                            f"empty score ({len(miss)} rows with an empty score)", "")
        rep["rows_with_empty_score"] = len(miss)
        rep["empty_score_cells"] = int(sum(np.isnan(r["quality"]).sum() for r in miss))
        if missing == "drop":
            rows = [r for r in rows if not np.isnan(r["quality"]).any()]
        rep["empty_score_rows_dropped"] = len(miss) if missing == "drop" else 0
        rep["rows_kept"] = len(rows)
        report["tasks"][task] = rep
        kept.extend(rows)

    cost = np.array([r["cost"] for r in kept], np.float64).reshape(len(kept), len(names))
    p, n, exact = recover_tokens(
        cost, np.array([s.price_in for s in specs]), np.array([s.price_out for s in specs]),
        responses=[r["responses"] for r in kept],
        prompt_chars=np.array([sum(len(s) for s in r["prompt_list"]) for r in kept], np.float64),
    )
    by_task = Counter(r["eval_name"] for r in kept)
    exact_by_task = Counter(r["eval_name"] for r, e in zip(kept, exact) if e)
    report["tokens"] = {
        "method": "exact from identical answers of two models with different price ratios; "
                  "else estimated (see recover_tokens)",
        "exact_rows": int(exact.sum()), "estimated_rows": int((~exact).sum()),
        "exact_rows_by_task": {t: int(exact_by_task[t]) for t in by_task},
        "estimated_rows_by_task": {t: int(by_task[t] - exact_by_task[t]) for t in by_task},
    }
    report["rows"] = len(kept)
    return Dataset(
        query_ids=[r["sample_id"] for r in kept],
        prompts=[r["prompt_list"][-1] for r in kept],
        tags=[(r["eval_name"],) for r in kept],
        models=names,
        quality=np.array([r["quality"] for r in kept], np.float32).reshape(len(kept), len(names)),
        cost=cost.astype(np.float32),
        prompt_tokens=p.astype(np.float32),
        completion_tokens=n.astype(np.float32),
        split=[split] * len(kept),
        latency_s=None,
        specs=list(specs),
        report=report,
    )


def _read_ids(path: Path) -> list[str]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        return [rec["sample_id"] for rec in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# Long JSONL format
# ----------------------------------------------------------------------------------------------

_JSONL_NUMBERS = ("cost", "prompt_tokens", "completion_tokens", "latency_s")


def _as_specs(models: str | Path | Sequence[ModelSpec]) -> list[ModelSpec]:
    if isinstance(models, (str, Path)):
        return load_models(models)
    specs = list(models)
    if not specs or not all(isinstance(s, ModelSpec) for s in specs):
        raise ValueError("models must be a models-file path or a non-empty list of ModelSpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names in specs: {names!r}")
    return specs


def load_jsonl(
    path: str | Path,
    models: str | Path | Sequence[ModelSpec],
    on_error: str = "raise",
    split: str | None = None,
    default_split: str = "train",
) -> Dataset:
    """Load the long format: one JSON object per line, one line per (query, LLM) outcome.

    Fields: ``query_id`` (str or int), ``prompt`` (str), ``model`` (a name from ``models``),
    ``quality`` (number in [0, 1], or null = call made but not scored) are required;
    ``cost`` (USD >= 0), ``prompt_tokens``, ``completion_tokens`` (>= 0), ``latency_s`` (>= 0),
    ``tags`` (list of str, or one str) and ``split`` (str, default ``default_split``) are optional;
    other keys are ignored. Blank lines are ignored.

    A scored line needs ``cost`` or both token counts; a missing cost is
    ``prompt_tokens * price_in + completion_tokens * price_out``; a missing completion count is
    derived from cost and the query's prompt count where possible. A query's prompt count is the
    first one given; a query with none gets ``len(prompt) / CHARS_PER_TOKEN`` (counted in the report).

    Columns are all models of ``models`` in their order; outcomes not logged are NaN.

    Errors (``DataError`` naming file, line, field and value): invalid JSON or NaN/Infinity, a
    missing required field, a wrong type, a quality outside [0, 1], an unknown model, a negative
    cost or count, a duplicate (query, model) pair, a query whose prompt/split/tags differ between
    lines, and a query with no scored outcome. With ``on_error="skip"`` the offending line (or, for
    the last, query) is left out instead and counted in ``report["skipped_lines"]`` /
    ``report["skipped_queries"]`` with the first messages in ``report["errors"]``.

    Args:
      split: keep only queries of this split (default all; see :meth:`Dataset.by_split`).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    specs = _as_specs(models)
    col = {s.name: j for j, s in enumerate(specs)}
    n_models = len(specs)
    errors: list[str] = []
    skipped_lines = 0

    def fail(line, field, msg, value=None):
        nonlocal skipped_lines
        err = DataError(path, line, field, msg, value)
        if on_error == "raise":
            raise err
        skipped_lines += 1
        if len(errors) < 20:
            errors.append(str(err))

    queries: dict[str, dict] = {}
    n_lines = 0
    with _open_text(path) as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            n_lines += 1
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except (json.JSONDecodeError, ValueError) as e:
                fail(lineno, None, f"invalid JSON: {e}", text.strip()[:80])
                continue
            if not isinstance(obj, dict):
                fail(lineno, None, "each line must be a JSON object", text.strip()[:80])
                continue
            rec = _check_line(obj, col, lineno, fail)
            if rec is None:
                continue
            q = queries.get(rec["query_id"])
            if q is None:
                q = queries[rec["query_id"]] = {
                    "prompt": rec["prompt"], "tags": rec["tags"], "split": rec["split"] or default_split,
                    "first_line": lineno, "lines": {}, "prompt_tokens": None,
                }
            else:
                if rec["prompt"] != q["prompt"]:
                    fail(lineno, "prompt", f"differs from the prompt of query {rec['query_id']!r} "
                         f"on line {q['first_line']}", rec["prompt"][:80])
                    continue
                if (rec["split"] or default_split) != q["split"]:
                    fail(lineno, "split", f"differs from split {q['split']!r} of query "
                         f"{rec['query_id']!r} on line {q['first_line']}", rec["split"])
                    continue
                if rec["tags"] is not None and q["tags"] is not None and rec["tags"] != q["tags"]:
                    fail(lineno, "tags", f"differ from tags {list(q['tags'])!r} of query "
                         f"{rec['query_id']!r} on line {q['first_line']}", list(rec["tags"]))
                    continue
                if q["tags"] is None:
                    q["tags"] = rec["tags"]
            if rec["model"] in q["lines"]:
                fail(lineno, "model", f"duplicate outcome for query {rec['query_id']!r} (first on line "
                     f"{q['lines'][rec['model']]['line']})", rec["model"])
                continue
            q["lines"][rec["model"]] = rec
            if q["prompt_tokens"] is None and rec["prompt_tokens"] is not None:
                q["prompt_tokens"] = rec["prompt_tokens"]

    skipped_queries = 0
    kept_ids = []
    for qid, q in queries.items():
        if all(r["quality"] is None for r in q["lines"].values()):
            err = DataError(path, q["first_line"], "quality", f"query {qid!r} has no scored outcome")
            if on_error == "raise":
                raise err
            skipped_queries += 1
            if len(errors) < 20:
                errors.append(str(err))
            continue
        if split is None or q["split"] == split:
            kept_ids.append(qid)

    n = len(kept_ids)
    quality = np.full((n, n_models), np.nan)
    cost = np.full((n, n_models), np.nan)
    ntok = np.full((n, n_models), np.nan)
    lat = np.full((n, n_models), np.nan)
    ptok = np.zeros(n)
    pin = np.array([s.price_in for s in specs])
    pout = np.array([s.price_out for s in specs])
    estimated_p = 0
    for i, qid in enumerate(kept_ids):
        q = queries[qid]
        if q["prompt_tokens"] is None:
            ptok[i] = len(q["prompt"]) / CHARS_PER_TOKEN
            estimated_p += 1
        else:
            ptok[i] = q["prompt_tokens"]
        for name, r in q["lines"].items():
            j = col[name]
            if r["quality"] is not None:
                quality[i, j] = r["quality"]
            if r["latency_s"] is not None:
                lat[i, j] = r["latency_s"]
            p_line = r["prompt_tokens"] if r["prompt_tokens"] is not None else ptok[i]
            if r["cost"] is not None:
                cost[i, j] = r["cost"]
            elif r["completion_tokens"] is not None and r["prompt_tokens"] is not None:
                cost[i, j] = r["prompt_tokens"] * pin[j] + r["completion_tokens"] * pout[j]
            if r["completion_tokens"] is not None:
                ntok[i, j] = r["completion_tokens"]
            elif r["cost"] is not None and pout[j] > 0:
                ntok[i, j] = max(0.0, (r["cost"] - p_line * pin[j]) / pout[j])
    report = {
        "source": str(path), "lines": n_lines, "outcomes": int(sum(len(queries[q]["lines"]) for q in kept_ids)),
        "queries": n, "skipped_lines": skipped_lines, "skipped_queries": skipped_queries,
        "errors": errors, "prompt_tokens_estimated": estimated_p,
        "missing_quality_cells": int(np.isnan(quality).sum()),
        "completion_tokens_unknown_cells": int(np.isnan(ntok).sum()),
    }
    return Dataset(
        query_ids=kept_ids,
        prompts=[queries[q]["prompt"] for q in kept_ids],
        tags=[queries[q]["tags"] or () for q in kept_ids],
        models=[s.name for s in specs],
        quality=quality, cost=cost, prompt_tokens=ptok, completion_tokens=ntok,
        split=[queries[q]["split"] for q in kept_ids],
        latency_s=lat if not np.all(np.isnan(lat)) else None,
        specs=specs, report=report,
    )


def _check_line(obj: dict, col: dict, lineno: int, fail) -> dict | None:
    """Validate one JSONL object; return a normalised record or None after calling ``fail``."""
    for key in ("query_id", "prompt", "model", "quality"):
        if key not in obj:
            return fail(lineno, key, "missing required field")
    qid = obj["query_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        return fail(lineno, "query_id", "must be a non-empty string or an integer", qid)
    if not isinstance(obj["prompt"], str):
        return fail(lineno, "prompt", "must be a string", obj["prompt"])
    model = obj["model"]
    if not isinstance(model, str) or model not in col:
        known = ", ".join(col) if len(col) <= 12 else ", ".join(list(col)[:12]) + ", ..."
        return fail(lineno, "model", f"unknown model (models file has: {known})", model)
    quality = obj["quality"]
    if quality is not None:
        if not _is_number(quality):
            return fail(lineno, "quality", "must be a number in [0, 1] or null", quality)
        if not 0.0 <= quality <= 1.0:
            return fail(lineno, "quality", "outside [0, 1]", quality)
    nums = {}
    for key in _JSONL_NUMBERS:
        v = obj.get(key)
        if v is not None:
            if not _is_number(v):
                return fail(lineno, key, "must be a number", v)
            if v < 0:
                return fail(lineno, key, "must be >= 0", v)
        nums[key] = None if v is None else float(v)
    if quality is not None and nums["cost"] is None and (
            nums["prompt_tokens"] is None or nums["completion_tokens"] is None):
        return fail(lineno, "cost", "missing: give cost, or both prompt_tokens and completion_tokens")
    tags = obj.get("tags")
    if tags is not None:
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return fail(lineno, "tags", "must be a string or a list of strings", obj.get("tags"))
        tags = tuple(tags)
    sp = obj.get("split")
    if sp is not None and (not isinstance(sp, str) or not sp):
        return fail(lineno, "split", "must be a non-empty string", sp)
    return {"query_id": str(qid), "prompt": obj["prompt"], "model": model,
            "quality": None if quality is None else float(quality), "tags": tags, "split": sp,
            "line": lineno, **nums}


def _num(x) -> float | None:
    """float32 value as the shortest decimal that reads back to the same float32; None for NaN."""
    x = np.float32(x)
    return None if np.isnan(x) else float(str(x))


def write_jsonl(dataset: Dataset, path: str | Path) -> int:
    """Write ``dataset`` in the long format of :func:`load_jsonl`; returns the number of lines.

    One line per (query, model) with an observed quality or cost; quality NaN is written as null.
    Numbers are written as the shortest decimals that read back to the same float32 values.
    """
    path = Path(path)
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, qid in enumerate(dataset.query_ids):
            for j, m in enumerate(dataset.models):
                q, c = dataset.quality[i, j], dataset.cost[i, j]
                if np.isnan(q) and np.isnan(c):
                    continue
                obj: dict[str, Any] = {"query_id": qid, "prompt": dataset.prompts[i], "model": m,
                                       "quality": _num(q)}
                for key, val in (("cost", c), ("prompt_tokens", dataset.prompt_tokens[i]),
                                 ("completion_tokens", dataset.completion_tokens[i, j]),
                                 ("latency_s", None if dataset.latency_s is None else dataset.latency_s[i, j])):
                    if val is not None and not np.isnan(val):
                        obj[key] = _num(val)
                if dataset.tags[i]:
                    obj["tags"] = list(dataset.tags[i])
                obj["split"] = dataset.split[i]
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                lines += 1
    return lines


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def split_offline_online(dataset: Dataset, frac_offline: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Randomly split rows into an offline (warm-start) part and an online (stream) part.

    ``round(frac_offline * N)`` rows go offline; the online part keeps a random stream order.
    """
    if not 0.0 <= frac_offline <= 1.0:
        raise ValueError(f"frac_offline must be in [0, 1], got {frac_offline!r}")
    perm = np.random.default_rng(seed).permutation(len(dataset))
    k = int(round(frac_offline * len(dataset)))
    return dataset.select(np.sort(perm[:k])), dataset.select(perm[k:])

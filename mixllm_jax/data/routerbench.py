"""RouterBench's wide CSVs (one file per task and split) and the recovery of their token counts."""

from __future__ import annotations

import ast
import csv
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mixllm_jax.data.dataset import (CHARS_PER_TOKEN, DataError, Dataset, in_range, load_models, open_text,
                                     range_text)
from mixllm_jax.util.paths import shared_dir


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

def _read_routerbench_csv(path: Path, models: list[str]) -> list[dict]:
    """Parse one wide CSV into rows {sample_id, eval_name, prompt_list, quality [M], cost [M], responses [M]}."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    line = 1
    try:
        with open_text(path) as f:
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
                line = start
                rows.append(_routerbench_row(path, rec, models, start))
            line = end + 1
    except (UnicodeDecodeError, csv.Error, OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile: OSError
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({type(e).__name__})"
        raise DataError(path, f"line {line} or after", None, f"{what}: {str(e)[:100]}") from None
    if not rows:
        raise DataError(path, 2, None, "the CSV has a header but no rows")
    return rows


def _routerbench_row(path: Path, rec: dict, models: list[str], start: int) -> dict:
    """One CSV record -> {sample_id, eval_name, prompt_list, quality [M], cost [M], responses [M]}."""
    where = (path, f"line {start} (sample_id {str(rec.get('sample_id'))[:40]!r})")
    if None in rec or any(v is None for v in rec.values()):
        raise DataError(*where, None, "the record has a different number of fields than the header")
    try:
        prompt = ast.literal_eval(rec["prompt"])
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise DataError(*where, "prompt", "not a Python-literal list of strings",
                        rec["prompt"][:80]) from None
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(s, str) for s in prompt):
        raise DataError(*where, "prompt", "expected a non-empty list of strings", rec["prompt"][:80])
    try:
        "".join(prompt).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(*where, "prompt", "holds a lone UTF-16 surrogate escape: not Unicode text") from None
    q = np.full(len(models), np.nan)
    c = np.full(len(models), np.nan)
    for j, m in enumerate(models):
        sq, sc = rec[m].strip(), rec[f"{m}|total_cost"].strip()
        if sq:
            try:
                q[j] = float(sq)
            except ValueError:
                raise DataError(*where, m, "quality is not a number", sq[:80]) from None
            if not 0.0 <= q[j] <= 1.0:
                raise DataError(*where, m, "quality outside [0, 1]", sq[:80])
        try:
            c[j] = float(sc)
        except ValueError:
            raise DataError(*where, f"{m}|total_cost", "cost is not a number", sc[:80]) from None
        if not in_range("cost", c[j]):
            raise DataError(*where, f"{m}|total_cost", f"cost must be a finite number in {range_text('cost')} USD",
                            sc[:80])
    return {"sample_id": rec["sample_id"], "eval_name": rec["eval_name"], "prompt_list": prompt,
            "quality": q, "cost": c, "responses": [rec[f"{m}|model_response"] for m in models], "line": start}


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
    try:
        with open_text(path) as f:
            return [str(rec.get("sample_id")) for rec in csv.DictReader(f)]
    except (UnicodeDecodeError, csv.Error, OSError, EOFError, zlib.error) as e:
        raise DataError(path, None, "sample_id", f"cannot be read ({type(e).__name__}: {str(e)[:100]})") from None


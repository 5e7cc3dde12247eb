"""The long JSONL format: one JSON object per line, one line per (query, LLM) outcome."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mixllm_jax.data.dataset import (CHARS_PER_TOKEN, DataError, Dataset, ModelSpec, _short, bounded_int,
                                     in_range, is_number, load_models, range_text, reject_constant)


# ----------------------------------------------------------------------------------------------
# Long JSONL format
# ----------------------------------------------------------------------------------------------

_JSONL_NUMBERS = ("cost", "prompt_tokens", "completion_tokens", "latency_s")


def _byte_lines(path: Path):
    """(line number, bytes) of a file, gunzipped when its name ends in .gz; a file that cannot be
    read or unzipped is a DataError naming the line reached."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(path, lineno + 1, None, f"cannot be read ({type(e).__name__}: {str(e)[:80]})") from None


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
    for lineno, raw in _byte_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            fail(lineno, None, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)")
            continue
        if not text.strip():
            continue
        n_lines += 1
        try:
            obj = json.loads(text, parse_constant=reject_constant, parse_int=bounded_int)
        except RecursionError:
            fail(lineno, None, "invalid JSON: nested too deeply")
            continue
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


def _is_text(s: str) -> bool:
    """Whether `s` is Unicode text (no lone surrogates, which JSON escapes can make)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_line(obj: dict, col: dict, lineno: int, fail) -> dict | None:
    """Validate one JSONL object; return a normalised record or None after calling ``fail``."""
    for key in ("query_id", "prompt", "model", "quality"):
        if key not in obj:
            return fail(lineno, key, "missing required field")
    qid = obj["query_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        return fail(lineno, "query_id", "must be a non-empty string or an integer", _short(qid))
    if not isinstance(obj["prompt"], str):
        return fail(lineno, "prompt", "must be a string", obj["prompt"])
    for key in ("query_id", "prompt", "model", "split"):
        if isinstance(obj.get(key), str) and not _is_text(obj[key]):
            return fail(lineno, key, "holds a lone UTF-16 surrogate escape (e.g. \\ud800): not Unicode text")
    model = obj["model"]
    if not isinstance(model, str) or model not in col:
        known = ", ".join(col) if len(col) <= 12 else ", ".join(list(col)[:12]) + ", ..."
        return fail(lineno, "model", f"unknown model (models file has: {known})", model)
    quality = obj["quality"]
    if quality is not None:
        if not is_number(quality):
            return fail(lineno, "quality", "must be a number in [0, 1] or null", quality)
        if not 0.0 <= quality <= 1.0:
            return fail(lineno, "quality", "outside [0, 1]", _short(quality))
    nums = {}
    for key in _JSONL_NUMBERS:
        v = obj.get(key)
        if v is not None:
            if not is_number(v):
                return fail(lineno, key, "must be a number", v)
            if v < 0:
                return fail(lineno, key, "must be >= 0", _short(v))
            if not in_range(key, v):
                return fail(lineno, key, f"outside the accepted range {range_text(key)}", _short(v))
        nums[key] = None if v is None else float(v)
    if quality is not None and nums["cost"] is None and (
            nums["prompt_tokens"] is None or nums["completion_tokens"] is None):
        return fail(lineno, "cost", "missing: give cost, or both prompt_tokens and completion_tokens")
    tags = obj.get("tags")
    if tags is not None:
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) and _is_text(t) for t in tags):
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

"""Logged routing outcomes: the Dataset, the models file, and checks shared by the loaders.

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
the line or row, the field and the value: invalid UTF-8 or gzip, malformed JSON or CSV, integers
of more than 40 digits, and numbers outside the accepted ranges of ``LIMITS`` (non-finite or
absurd costs, token counts, prices, latency figures, concurrency).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

LIMITS = {  # accepted range of every number the loaders read: finite, and far from float32's limits
    "price_in_per_mtok": (0.0, 1e5), "price_out_per_mtok": (0.0, 1e5),  # USD per million tokens
    "ttft_s": (0.0, 3600.0), "tokens_per_s": (0.0, 1e6), "max_concurrency": (0, 4096),  # ttft, tps, concurrency: > 0
    "context_window": (0, 1e8),  # tokens: > 0
    "cost": (0.0, 1e4),  # USD per call
    "prompt_tokens": (0.0, 1e8), "completion_tokens": (0.0, 1e8), "latency_s": (0.0, 86400.0),
}
MAX_INT_DIGITS = 40


def in_range(key: str, v: Any, *, positive: bool = False) -> bool:
    """Whether the number `v` (int or float; no overflow for huge ints) is in LIMITS[key]."""
    lo, hi = LIMITS[key]
    return is_number(v) and (v > lo if positive else v >= lo) and v <= hi


def range_text(key: str, positive: bool = False) -> str:
    lo, hi = LIMITS[key]
    return f"{'(' if positive else '['}{lo:g}, {hi:g}]"


def bounded_int(s: str) -> int:
    """``parse_int`` hook of ``json.loads``: integers of more than MAX_INT_DIGITS digits are errors."""
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(s)


CHARS_PER_TOKEN = 4.0
"""Rule-of-thumb characters per token, used only where a token count must be estimated (and reported)."""


def _clip(text: str, n: int = 200) -> str:
    """An offending value's repr, cut to `n` characters for the message."""
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``FILE:LINE: field 'F': message (value V)``."""

    def __init__(self, path: Any, line: Any, field: str | None, message: str, value: Any = None):
        self.path, self.line, self.field, self.value = str(path), line, field, value
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f" field '{field}':" if field else ""
        val = f" (value {_clip(repr(value))})" if value is not None else ""
        super().__init__(f"{where}:{what} {message}{val}")


# ----------------------------------------------------------------------------------------------
# Models file
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One LLM: prices in USD per million tokens, an (optional, assumed) latency profile and its
    context window in tokens (optional: the server refuses it requests that would not fit)."""

    name: str
    price_in_per_mtok: float
    price_out_per_mtok: float
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    max_concurrency: int | None = None
    context_window: int | None = None

    @property
    def price_in(self) -> float:
        """USD per prompt token."""
        return self.price_in_per_mtok * 1e-6

    @property
    def price_out(self) -> float:
        """USD per completion token."""
        return self.price_out_per_mtok * 1e-6


_SPEC_REQUIRED = ("name", "price_in_per_mtok", "price_out_per_mtok")
_SPEC_OPTIONAL = ("ttft_s", "tokens_per_s", "max_concurrency", "context_window")
_SPEC_NOTES = ("provider", "as_of", "source")  # strings a catalog records (checked, not kept): catalog/
_INTEGER = ("max_concurrency", "context_window")


def is_number(v: Any) -> bool:
    """A JSON number (int or float, not bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_models(path: str | Path) -> list[ModelSpec]:
    """Read a models file: ``{"models": [{"name", "price_in_per_mtok", "price_out_per_mtok",
    "ttft_s"?, "tokens_per_s"?, "max_concurrency"?, "context_window"?, "provider"?, "as_of"?,
    "source"?}, ...]}`` (a bare list is accepted too). ``catalog:NAME`` reads the price catalog
    shipped in the package (mixllm_jax/catalog: e.g. ``catalog:openai``, ``catalog:all``).

    Raises :class:`DataError` naming the file, the model and the field for a missing field, a
    negative or non-finite price, a non-positive latency figure, an unknown key or a duplicate name.
    """
    if str(path).startswith("catalog:"):
        from mixllm_jax.catalog import catalog_path

        path = catalog_path(str(path)[len("catalog:"):])
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = json.loads(text, parse_constant=reject_constant, parse_int=bounded_int)
    except RecursionError:
        raise DataError(path, None, None, "not valid JSON: nested too deeply") from None
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
        unknown = sorted(set(e) - set(_SPEC_REQUIRED) - set(_SPEC_OPTIONAL) - set(_SPEC_NOTES))
        if unknown:
            raise DataError(path, None, unknown[0], f"{label}: unknown field (allowed: "
                            f"{', '.join(_SPEC_REQUIRED + _SPEC_OPTIONAL + _SPEC_NOTES)})")
        for key in _SPEC_NOTES:
            v = e.get(key)
            if v is not None and (not isinstance(v, str) or len(v) > 500 or not v.isprintable()):
                raise DataError(path, None, key, f"{label}: must be a printable string of at most 500 "
                                f"characters or absent", _short(v))
        if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
            raise DataError(path, None, "name", f"{label}: must be a printable string of 1-200 characters",
                            name if not isinstance(name, str) else name[:80])
        if name in seen:
            raise DataError(path, None, "name", "duplicate model name", name)
        seen.add(name)
        for key in ("price_in_per_mtok", "price_out_per_mtok"):
            v = e[key]
            if not in_range(key, v):
                raise DataError(path, None, key, f"{label}: must be a finite number in {range_text(key)}", _short(v))
        for key in _SPEC_OPTIONAL:
            v = e.get(key)
            if v is not None and (not in_range(key, v, positive=True) or (key in _INTEGER and v != int(v))):
                raise DataError(path, None, key, f"{label}: must be a "
                                f"{'integer' if key in _INTEGER else 'number'} in "
                                f"{range_text(key, positive=True)} or absent", _short(v))
        specs.append(ModelSpec(
            name=name,
            price_in_per_mtok=float(e["price_in_per_mtok"]),
            price_out_per_mtok=float(e["price_out_per_mtok"]),
            ttft_s=None if e.get("ttft_s") is None else float(e["ttft_s"]),
            tokens_per_s=None if e.get("tokens_per_s") is None else float(e["tokens_per_s"]),
            max_concurrency=None if e.get("max_concurrency") is None else int(e["max_concurrency"]),
            context_window=None if e.get("context_window") is None else int(e["context_window"]),
        ))
    return specs


def _short(v: Any) -> Any:
    """A value for an error message: a huge int or long string cut short."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10 ** 20:
        return f"{str(v)[:12]}... ({len(str(v))} digits)"
    return v[:80] if isinstance(v, str) else v


def reject_constant(name: str) -> Any:
    """``parse_constant`` hook of ``json.loads``: NaN, Infinity and -Infinity are errors."""
    raise ValueError(f"{name} is not allowed")


def open_text(path: Path):
    """Open a text file, gzip-compressed when its name ends in ``.gz`` (for the loaders)."""
    return gzip.open(path, "rt", newline="", encoding="utf-8") if path.suffix == ".gz" else \
        open(path, newline="", encoding="utf-8")


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

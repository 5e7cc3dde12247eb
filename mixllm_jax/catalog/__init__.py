"""A price catalog of common hosted LLMs, shipped with the package: one models file per provider.

Each entry is a models.json entry (data.load_models) with its provenance: ``price_in_per_mtok``
and ``price_out_per_mtok`` in USD per million tokens (standard tier: no batch, cache or
long-context rates), ``context_window`` in tokens, ``as_of`` (the date the prices were taken,
YYYY-MM-DD) and ``source`` (the provider's price page). Prices change: check them before you rely
on them, and copy a file to edit it.

Use it wherever a models file goes: ``--models catalog:openai`` (or ``catalog:all``),
``data.load_models("catalog:anthropic")``, ``serve --context-windows catalog:all``, or the path
``catalog_path("google")``.
"""

from __future__ import annotations

import datetime
import json
import re
import tempfile
from pathlib import Path

DIR = Path(__file__).resolve().parent
PROVIDERS = ("openai", "anthropic", "google")
_ALL = "all"


def catalog_names() -> tuple[str, ...]:
    """The catalogs: one per provider, and "all"."""
    return PROVIDERS + (_ALL,)


def entries(name: str) -> list[dict]:
    """The raw entries of catalog `name`, checked: every field present, an ISO date, an https source
    (ValueError naming the catalog and the entry otherwise)."""
    if name not in catalog_names():
        raise ValueError(f"unknown catalog {name!r}: use one of {', '.join(catalog_names())}")
    out = []
    for prov in PROVIDERS if name == _ALL else (name,):
        for i, e in enumerate(json.loads((DIR / f"{prov}.json").read_text(encoding="utf-8"))["models"]):
            where = f"catalog {prov}: models[{i}] ({e.get('name')!r})"
            missing = [k for k in ("name", "provider", "price_in_per_mtok", "price_out_per_mtok", "context_window",
                                   "as_of", "source") if k not in e]
            if missing:
                raise ValueError(f"{where}: missing {missing}")
            datetime.date.fromisoformat(e["as_of"])
            if not re.fullmatch(r"https://[^\s]+", e["source"]) or e["provider"] != prov:
                raise ValueError(f"{where}: source must be an https URL and provider {prov!r}")
            out.append(e)
    return out


def catalog_path(name: str) -> Path:
    """The models file of catalog `name` ("all": the providers' files merged, written once to a
    temporary file)."""
    if name in PROVIDERS:
        return DIR / f"{name}.json"
    rows = entries(name)
    path = Path(tempfile.gettempdir()) / "mixllm-jax-catalog-all.json"
    text = json.dumps({"models": rows})
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(f".{id(rows)}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path

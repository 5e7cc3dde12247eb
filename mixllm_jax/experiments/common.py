"""What every experiment shares: the data and its features, the offline router, the stream policy,
the lambda sweeps and calibration, and writing a result (NAME.json, NAME.md, NAME.png)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax import data as data_mod
from mixllm_jax import encoder, evaluate, metrics, simulate as sim, tags, train
from mixllm_jax.data import Dataset
from mixllm_jax.policy import Policy
from mixllm_jax.router import Router
from mixllm_jax.state import ArmRegistry, grow

EXPERIMENTS = ("latency", "continual", "llm-changes", "out-of-domain")
REFERENCE = sim.REFERENCE
BUDGET_PCT = evaluate.PAPER_BUDGET_PCT
PAPER_TABLE1 = {"refined": {0.8: 1.21, 0.5: 1.39, 0.3: 2.22}, "binary": {0.8: 0.52, 0.5: 0.53, 0.3: 1.31}}
PAPER_OOD = {"none": -5.44, "online": -3.35}
STREAM_BETA, STREAM_TAU, STREAM_ALPHA = 0.1, 10.0, 0.01
"""The stream router's latency penalty: the paper's beta = 0.1, with the penalty starting at 10 s
(a third of the 30 s tolerance: the router's load view is up to one 10 s refresh old, so a penalty
that starts only at the tolerance reacts after queries already time out; see the latency table)."""


# ----------------------------------------------------------------------------------------------
# Data and features
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentData:
    """Train / test datasets with their encoder embeddings (or stand-in features) and how to train."""

    train: Dataset
    test: Dataset
    e_train: np.ndarray  # [N_train, H]
    e_test: np.ndarray  # [N_test, H]
    head_config: tags.HeadConfig | None = tags.HeadConfig()
    feature_mode: str = "raw+domain"
    max_length: int = 128
    features: str = "encoder"  # "encoder" | "onehot" (for the notes)


def onehot_features(*datasets: Dataset) -> list[np.ndarray]:
    """One-hot of each query's task over the tasks of all the datasets: stand-in features for quick runs."""
    keys = [evaluate.task_keys(d.tags) for d in datasets]
    names = list(dict.fromkeys(k for ks in keys for k in ks))
    return [np.eye(len(names), dtype=np.float32)[[names.index(k) for k in ks]] for ks in keys]


def load_data(quick: bool = False, *, features: str | None = None, max_length: int = 128,
              quick_rows: tuple[int, int] = (360, 180), seed: int = 0, data_dir=None,
              encoder_name=None, progress: bool = True) -> ExperimentData:
    """The RouterBench slice (train and test splits) with features.

    features "encoder" (default; quick: "onehot"): cached embeddings of the default encoder at
    `max_length` (left truncation) and the tag-enhanced head; "onehot": the task's one-hot, no head
    (a routing-by-task stand-in that needs no encoder). quick keeps a random `quick_rows` subset.
    """
    features = features or ("onehot" if quick else "encoder")
    if features not in ("encoder", "onehot"):
        raise ValueError(f"features must be 'encoder' or 'onehot', got {features!r}")
    tr = data_mod.load_routerbench(data_dir, split="train")
    te = data_mod.load_routerbench(data_dir, split="test")
    if quick:
        rng = np.random.default_rng(seed)
        tr = tr.select(np.sort(rng.permutation(len(tr))[: quick_rows[0]]))
        te = te.select(np.sort(rng.permutation(len(te))[: quick_rows[1]]))
    if features == "onehot":
        e_tr, e_te = onehot_features(tr, te)
        return ExperimentData(tr, te, e_tr, e_te, head_config=None, feature_mode="raw",
                              max_length=max_length, features="onehot")
    enc = encoder.load_encoder(encoder_name)
    e_tr = train.embed(enc, tr, max_length=max_length, progress=progress)
    e_te = train.embed(enc, te, max_length=max_length, progress=progress)
    return ExperimentData(tr, te, e_tr, e_te, max_length=max_length, features="encoder")


def select_models(ds: Dataset, names: Sequence[str]) -> Dataset:
    """The same queries with only the LLM columns `names` (in that order)."""
    idx = [ds.models.index(n) for n in names]
    return dataclasses.replace(
        ds, models=list(names), quality=ds.quality[:, idx], cost=ds.cost[:, idx],
        completion_tokens=ds.completion_tokens[:, idx],
        latency_s=None if ds.latency_s is None else ds.latency_s[:, idx],
        specs=None if ds.specs is None else [ds.specs[i] for i in idx])


def concat(parts: Sequence[Dataset]) -> Dataset:
    f = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    lst = lambda name: [v for p in parts for v in getattr(p, name)]  # noqa: E731
    return Dataset(query_ids=lst("query_ids"), prompts=lst("prompts"), tags=lst("tags"), models=list(parts[0].models),
                   quality=f("quality"), cost=f("cost"), prompt_tokens=f("prompt_tokens"),
                   completion_tokens=f("completion_tokens"), split=lst("split"), latency_s=None,
                   specs=parts[0].specs, report={})


# ----------------------------------------------------------------------------------------------
# The offline router, its lambda sweeps and the stream policy
# ----------------------------------------------------------------------------------------------


def fit_offline(ds: Dataset, e: np.ndarray, d: ExperimentData, capacity: int | None = None,
           progress: bool = True) -> Router:
    """Full-information offline training (train.train_router) on cached embeddings, no encoder."""
    router = train.train_router(ds, ds.specs, None, head_config=d.head_config, max_length=d.max_length,
                                feature_mode=d.feature_mode, embeddings=e, progress=progress)
    if capacity is not None and capacity > router.state.capacity:  # room for LLMs added later
        router.state = grow(router.state, capacity)
        reg = ArmRegistry.from_dict(router.registry.to_dict())
        reg.capacity = capacity
        router.registry = reg
    return router


def router_features(router: Router, e: np.ndarray) -> np.ndarray:
    return np.asarray(router.embed_features(e))


def sweep(state, registry, x, ds: Dataset, alpha: float, extra_weights=(), bonus=None) -> tuple[list, list]:
    """(cost weights, points) of a no-load lambda sweep of a router state on ds."""
    cws = sorted(set(map(float, evaluate.COST_WEIGHTS)) | set(map(float, extra_weights)))
    ch = sim.offline_choices(state, registry, x, ds.prompt_tokens, ds.models, cws, alpha, bonus)
    return cws, sim.points(ch, ds)


def calibrate(router: Router, x: np.ndarray, ds: Dataset, budget_pct: float, alpha: float) -> float:
    cws, pts = sweep(router.state, router.registry, x, ds, alpha)
    return sim.calibrate_cost_weight(pts, cws, budget_pct)


def point_at(cws, pts, lam) -> dict:
    return pts[cws.index(float(lam))]


def best_under(pts, cap) -> float:
    return metrics.best_quality_under_cost([p["cost_pct"] for p in pts], [p["quality_pct"] for p in pts],
                                           cap * (1 + 1e-9) + 1e-12)


def stream_order(n: int, seed: int, repeat: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(repeat)])


def split_idx(n: int, frac_offline: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Offline rows (sorted) and online rows (random stream order), as data.split_offline_online."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(frac_offline * n))
    return np.sort(perm[:k]), perm[k:]


def stream_policy(lam, beta=STREAM_BETA, tau=STREAM_TAU, alpha=STREAM_ALPHA) -> Policy:
    return Policy(cost_weight=float(lam), alpha=float(alpha), beta=float(beta), tau=float(tau), in_batch_load=True)


def hull_at(pts: list[dict], cap: float) -> float:
    """Quality on the non-decreasing convex hull of a sweep's points at cost `cap` (the best quality
    reachable at cost <= cap, mixing two cost weights where needed; RouterBench's definition)."""
    return metrics.hull_quality_at_cost([p["cost_pct"] for p in pts], [p["quality_pct"] for p in pts], cap)


def band_quality(pts: list[dict], band: tuple[float, float] = (5.0, 30.0)) -> float:
    """Mean hull quality over a band of cost % (an AIQ restricted to the budgets that matter)."""
    cs = np.linspace(band[0], band[1], 26)
    return float(np.mean([hull_at(pts, c) for c in cs]))


# ----------------------------------------------------------------------------------------------
# Results: numbers, tables and files
# ----------------------------------------------------------------------------------------------


def rel_pct(a, b) -> float | None:
    """Relative change of a over b, in %."""
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return float(100.0 * (a - b) / b)


def json_safe(o):
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    return o


def fmt(v, nd=2, signed=False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def short(name: str) -> str:
    return name.split("/")[-1]


def config_dict(c: sim.StreamConfig) -> dict:
    return dataclasses.asdict(c)


def write_outputs(out_dir, name: str, report: dict, md: str, fig) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    report = dict(report, files={k: str(v) for k, v in paths.items()})
    paths["json"].write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(md.rstrip() + f"\n\n![{name}]({name}.png)\n")
    fig.savefig(paths["png"], dpi=110)
    return paths

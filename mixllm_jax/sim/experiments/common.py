"""What every experiment shares: the data and its features, the offline router, the stream policy,
the lambda sweeps and calibration, and writing a result (NAME.json, NAME.md, NAME.png)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax.core.config import Budget, RouterConfig
from mixllm_jax import data as data_mod
from mixllm_jax.text import encoder, tags
from mixllm_jax.offline import evaluate, train
from mixllm_jax.core import fit, metrics, observation
from mixllm_jax.sim import offline_eval, simulate as sim
from mixllm_jax.data import Dataset
from mixllm_jax.core.policy import Policy
from mixllm_jax.text.router import Router
from mixllm_jax.core.state import ArmRegistry, grow

EXPERIMENTS = ("latency", "continual", "llm-changes", "out-of-domain", "ope")
REFERENCE = sim.REFERENCE
BUDGET_PCT = evaluate.PAPER_BUDGET_PCT
PAPER_TABLE1 = {"refined": {0.8: 1.21, 0.5: 1.39, 0.3: 2.22}, "binary": {0.8: 0.52, 0.5: 0.53, 0.3: 1.31}}
PAPER_OOD = {"none": -5.44, "online": -3.35}
ONLINE_ALPHA = 1.0
"""Exploration weight of the online-learning experiments, in posterior s.d.s of the predicted
quality (UCB bonus alpha * u, Thompson draw s.d. alpha * u; bandit.predict)."""
BINARY_TEMPERATURE = 0.05
"""Softmax temperature (quality units) of the decisions that feed the binary-feedback network: the
on-policy policy-gradient needs a stochastic policy (feedback.py)."""
FAST_FIT = {"ridge_selection": "evidence", "folds": 0}
"""How the online experiments fit their many offline routers: each arm's ridge by evidence in one
pass, instead of the 5-fold validation choice (40 fits per router, too slow for the 9-15 routers of
one experiment on a 2-core machine). The same for every mode of a comparison."""
ONLINE_MODES = {
    "none": ("none", {"explore": "greedy"}),
    "refined": ("refined", {}),  # the experiment's `explore` (default ucb)
    "binary": ("binary", {"explore": "greedy", "temperature": BINARY_TEMPERATURE}),
    "refined_greedy": ("refined", {"explore": "greedy"}),
    "refined_thompson": ("refined", {"explore": "thompson"}),
}
"""The streams of the online experiments: mode -> (simulate learning mode, policy changes)."""
STREAM_BETA, STREAM_TAU, STREAM_ALPHA = 0.1, 10.0, 0.01
"""The stream router's latency penalty: the paper's beta = 0.1, with the penalty starting at 10 s
(a third of the 30 s tolerance: the router's load view is up to one 10 s refresh old, so a penalty
that starts only at the tolerance reacts after queries already time out; see the latency table)."""


# ----------------------------------------------------------------------------------------------
# Data and features
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentData:
    """Train / test (/ ood) datasets with their encoder embeddings (or stand-in features), how to
    train, and the reference LLM whose logged totals are 100% in every table."""

    train: Dataset
    test: Dataset
    e_train: np.ndarray  # [N_train, H]
    e_test: np.ndarray  # [N_test, H]
    config: RouterConfig = RouterConfig(budget=Budget("cost_weight", 0.0))  # experiments sweep lambda
    features: str = "encoder"  # "encoder" | "onehot" (for the notes)
    reference: str = REFERENCE
    ood: Dataset | None = None  # the data's `ood` split (tasks never seen in train), if it has one
    e_ood: np.ndarray | None = None  # [N_ood, H]
    name: str = "RouterBench"  # where the data came from (for the notes)

    def __post_init__(self):
        check_reference(self.train.models, self.reference)

    def info(self) -> dict:
        """What the reports say about the data."""
        return {"name": self.name, "reference": self.reference, "features": self.features,
                "n_train": len(self.train), "n_test": len(self.test),
                "n_ood": None if self.ood is None else len(self.ood), "models": list(self.train.models),
                "cost_blind": cost_blind(self.train)}


def check_reference(models: Sequence[str], reference: str) -> str:
    """`reference` if it is one of `models`, else a ValueError that lists them."""
    if reference not in models:
        raise ValueError(f"reference LLM {reference!r} is not a model of the data; choose one of "
                         f"{', '.join(models)} (--reference)")
    return reference


def cost_blind(ds: Dataset) -> bool:
    """True when every query's logged cost is the same for every LLM (e.g. equal prices and token
    counts): cost cannot separate the LLMs, so routing is on quality alone (cost weight 0)."""
    return bool(len(ds)) and bool(np.allclose(ds.cost, ds.cost[:, :1], rtol=1e-6, atol=0.0))


def onehot_features(*datasets: Dataset) -> list[np.ndarray]:
    """One-hot of each query's task over the tasks of all the datasets: stand-in features for quick runs."""
    keys = [evaluate.task_keys(d.tags) for d in datasets]
    names = list(dict.fromkeys(k for ks in keys for k in ks))
    return [np.eye(len(names), dtype=np.float32)[[names.index(k) for k in ks]] for ks in keys]


def load_splits(data_path: str | Path | None = None,
                models: str | Path | None = None) -> tuple[Dataset, Dataset, Dataset | None, str]:
    """(train, test, ood or None, name) of a RouterBench folder (default: the shared slice; it
    brings its own models.json) or a long-format JSONL file (`models`: its models file, required)
    with splits `train` and `test`, and optionally `ood`. Every query needs every LLM's outcome
    (the simulator looks up whichever LLM a method picks)."""
    if data_path is None or Path(data_path).is_dir():
        root = Path(data_path) if data_path is not None else data_mod.routerbench_dir()
        if models is not None and Path(models).resolve() != (root / "models.json").resolve():
            raise ValueError(f"a RouterBench folder brings its own models.json ({root / 'models.json'}); "
                             "models (--models) goes with a JSONL file")
        return (data_mod.load_routerbench(data_path, split="train"),
                data_mod.load_routerbench(data_path, split="test"), None, "RouterBench")
    if models is None:
        raise ValueError(f"{data_path}: a JSONL data file needs its models file (models=, --models)")
    parts = data_mod.load_jsonl(data_path, models).by_split()
    missing = [s for s in ("train", "test") if s not in parts]
    if missing:
        raise ValueError(f"{data_path} has no rows with split {missing[0]!r} (splits: {sorted(parts)}); "
                         "the experiments need train and test (and use ood when present)")
    for split, ds in parts.items():
        bad = np.isnan(ds.quality).any(1) | np.isnan(ds.completion_tokens).any(1) | np.isnan(ds.cost).any(1)
        if bad.any():
            raise ValueError(f"{data_path}: {int(bad.sum())} {split} queries lack some LLM's quality, cost or "
                             f"completion tokens (e.g. {ds.query_ids[int(np.argmax(bad))]!r}); the experiments "
                             "need every LLM's outcome of every query")
    return parts["train"], parts["test"], parts.get("ood"), str(data_path)


def load_data(quick: bool = False, *, features: str | None = None, max_length: int = 128,
              quick_rows: tuple[int, int] = (360, 180), seed: int = 0, data_path: str | Path | None = None,
              models: str | Path | None = None, reference: str | None = None, encoder_name=None,
              progress: bool = True) -> ExperimentData:
    """Train and test splits (and `ood` when the data has it) with features: the RouterBench slice
    by default, or `data_path` (see `load_splits`); `reference` (default gpt-4-1106-preview) is the
    LLM whose logged totals are 100%.

    features "encoder" (default; quick: "onehot"): cached embeddings of the default encoder at
    `max_length` (left truncation) and the tag-enhanced head; "onehot": the task's one-hot, no head
    (a routing-by-task stand-in that needs no encoder). quick keeps a random `quick_rows` subset
    (train, test; the ood split keeps as many rows as test).
    """
    features = features or ("onehot" if quick else "encoder")
    if features not in ("encoder", "onehot"):
        raise ValueError(f"features must be 'encoder' or 'onehot', got {features!r}")
    tr, te, ood, name = load_splits(data_path, models)
    reference = check_reference(tr.models, reference or REFERENCE)
    if quick:
        rng = np.random.default_rng(seed)
        tr = tr.select(np.sort(rng.permutation(len(tr))[: quick_rows[0]]))
        te = te.select(np.sort(rng.permutation(len(te))[: quick_rows[1]]))
        if ood is not None:
            ood = ood.select(np.sort(rng.permutation(len(ood))[: quick_rows[1]]))
    parts = [tr, te] + ([ood] if ood is not None else [])
    if features == "onehot":
        es = onehot_features(*parts)
        config = RouterConfig(max_length=max_length, head=None, features="raw", ridge_selection="evidence",
                              folds=0, budget=Budget("cost_weight", 0.0))
        return ExperimentData(tr, te, es[0], es[1], config=config, features="onehot", reference=reference, ood=ood,
                              e_ood=es[2] if ood is not None else None, name=name)
    enc = encoder.load_encoder(encoder_name)
    es = [train.embed(enc, ds, max_length=max_length, progress=progress) for ds in parts]
    config = RouterConfig(max_length=max_length, budget=Budget("cost_weight", 0.0))
    return ExperimentData(tr, te, es[0], es[1], config=config, features="encoder", reference=reference,
                          ood=ood, e_ood=es[2] if ood is not None else None, name=name)


def select_models(ds: Dataset, names: Sequence[str]) -> Dataset:
    """The same queries with only the LLM columns `names` (in that order)."""
    idx = [ds.models.index(n) for n in names]
    return dataclasses.replace(
        ds, models=list(names), quality=ds.quality[:, idx], cost=ds.cost[:, idx],
        completion_tokens=ds.completion_tokens[:, idx],
        latency_s=None if ds.latency_s is None else ds.latency_s[:, idx],
        specs=None if ds.specs is None else [ds.specs[i] for i in idx])


def concat(parts: Sequence[Dataset]) -> Dataset:
    """The rows of `parts` (same LLM columns) one after the other; no latency_s, an empty report."""
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
    router = train.train_router(ds, ds.specs, None, d.config, embeddings=e, progress=progress)
    if capacity is not None and capacity > router.state.capacity:  # room for LLMs added later
        router.state = grow(router.state, capacity)
        reg = ArmRegistry.from_dict(router.registry.to_dict())
        reg.capacity = capacity
        router.registry = reg
    return router


def refit_arms(router: Router, xs: Sequence[np.ndarray], parts: Sequence[Dataset]):
    """The router's arms refitted on the logs `parts` together (features xs [N_i, d], every LLM's
    outcome), each arm's prior re-chosen by evidence among the config's candidates: what full
    information could teach the arms, their hyper-parameters included. Returns the state."""
    ds, x = concat(parts), np.concatenate(xs)
    state, _ = fit.fit_state(router.state, router.registry.columns(ds.models), x, ds.quality,
                             observation.log_tokens(ds.completion_tokens), train.prior_candidates(router, x.shape[1]))
    return state


def router_features(router: Router, e: np.ndarray) -> np.ndarray:
    """The router's bandit features [N, d] of embeddings (or stand-in features) e [N, H]."""
    return np.asarray(router.embed_features(e))


def sweep(state, registry, x, ds: Dataset, alpha: float, extra_weights=(), bonus=None,
          reference: str = REFERENCE) -> tuple[list, list]:
    """(cost weights, points) of a no-load lambda sweep of a router state on ds (% of `reference`)."""
    cws = sorted(set(map(float, evaluate.COST_WEIGHTS)) | set(map(float, extra_weights)))
    ch = offline_eval.offline_choices(state, registry, x, ds.prompt_tokens, ds.models, cws, alpha, bonus)
    return cws, offline_eval.points(ch, ds, reference)


def calibrate(router: Router, x: np.ndarray, ds: Dataset, budget_pct: float, alpha: float,
              reference: str = REFERENCE) -> float:
    """The cost weight whose sweep on ds spends at most `budget_pct`% of the reference's cost
    (`simulate.calibrate_cost_weight`); 0 on cost-blind data (`cost_blind`), where no cost weight
    changes the spend and a positive one would only route on noise in the predicted costs."""
    if cost_blind(ds):
        return 0.0
    cws, pts = sweep(router.state, router.registry, x, ds, alpha, reference=reference)
    return offline_eval.calibrate_cost_weight(pts, cws, budget_pct)


def calibration_note(d: ExperimentData, budget_pct: float, on: str) -> str:
    """How the cost weight was chosen, for the reports."""
    if cost_blind(d.train):
        return "the LLMs' logged costs are equal on every query: cost-blind data, quality only"
    return f"calibrated on {on} to {budget_pct}% cost"


def point_at(cws, pts, lam) -> dict:
    """The sweep point at cost weight lam (one of cws)."""
    return pts[cws.index(float(lam))]


def best_under(pts, cap) -> float:
    """The best quality % of a sweep point at cost % <= cap (no mixing)."""
    return metrics.best_quality_under_cost([p["cost_pct"] for p in pts], [p["quality_pct"] for p in pts],
                                           cap * (1 + 1e-9) + 1e-12)


def stream_order(n: int, seed: int, repeat: int = 1) -> np.ndarray:
    """`repeat` random permutations of range(n), one after the other."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(repeat)])


def split_idx(n: int, frac_offline: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Offline rows (sorted) and online rows (random stream order), as data.split_offline_online."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(frac_offline * n))
    return np.sort(perm[:k]), perm[k:]


def stream_policy(lam, beta=STREAM_BETA, tau=STREAM_TAU, alpha=STREAM_ALPHA, **kw) -> Policy:
    """The stream router's policy: cost weight lam, latency penalty (beta, tau), in-batch load on;
    kw: other Policy fields (explore, temperature, epsilon)."""
    return Policy(cost_weight=float(lam), alpha=float(alpha), beta=float(beta), tau=float(tau), in_batch_load=True,
                  **kw)


def mode_policy(mode: str, lam, beta, tau, alpha, explore: str = "ucb") -> tuple[str, Policy]:
    """(simulate learning mode, stream policy) of an online-experiment mode (ONLINE_MODES)."""
    if mode not in ONLINE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ONLINE_MODES)}")
    learning, kw = ONLINE_MODES[mode]
    return learning, stream_policy(lam, beta, tau, alpha, **{"explore": explore, **kw})


def utility(res: sim.StreamResult, lam: float) -> np.ndarray:
    """Per-query reward of a stream's choices: logged quality - lam * cost (USD), no deadline."""
    return res.quality_raw - float(lam) * res.cost


def regret_curve(res: sim.StreamResult, best: np.ndarray, lam: float, points: int = 60) -> dict:
    """Cumulative regret of a stream against per-query rewards `best` [N] of the best fixed policy
    in hindsight: {"n": query counts, "regret": cumulative regret at those counts, "final"}."""
    r = np.cumsum(best - utility(res, lam))
    idx = np.unique(np.linspace(0, len(r) - 1, points).round().astype(int))
    return {"n": (idx + 1).tolist(), "regret": r[idx].tolist(), "final": float(r[-1])}


def arm_trace(res: sim.StreamResult, windows: int = 10) -> list[list[int]]:
    """Queries routed to each LLM column in each of `windows` equal slices of the stream: [W][M]."""
    cuts = np.linspace(0, len(res.model), windows + 1).round().astype(int)
    M = len(res.stream.models)
    return [np.bincount(res.model[a:b], minlength=M).tolist() for a, b in zip(cuts[:-1], cuts[1:])]


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


def data_note(r: dict) -> str:
    """One line for a report's markdown: which data, how much of it, and the 100% reference."""
    i = r["data"]
    ood = f" / {i['n_ood']} ood" if i["n_ood"] is not None else ""
    return (f"Data: {i['name']} ({i['n_train']} train / {i['n_test']} test{ood} queries, {len(i['models'])} LLMs, "
            f"{i['features']} features); 100% = {i['reference']}'s logged totals.")


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
    """A number for a table (nd decimals, optionally signed); "-" for None / NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def short(name: str) -> str:
    """An LLM name without its organisation prefix."""
    return name.split("/")[-1]


def config_dict(c: sim.StreamConfig) -> dict:
    """A stream configuration as a JSON-able dict."""
    return dataclasses.asdict(c)


def write_outputs(out_dir, name: str, report: dict, md: str, fig) -> dict[str, Path]:
    """Write NAME.json (the report, JSON-safe), NAME.md (the tables, linking the plot) and NAME.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    report = dict(report, files={k: str(v) for k, v in paths.items()})
    paths["json"].write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(md.rstrip() + f"\n\n![{name}]({name}.png)\n")
    fig.savefig(paths["png"], dpi=110)
    return paths

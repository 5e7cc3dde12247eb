"""Offline training: optionally fine-tune the encoder, encode (cached), derive or read domains, train the tag-enhanced head, fit every
arm (evidence-chosen ridge, unshrunk intercepts), and calibrate the budget on held-out train data."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mixllm_jax.core import budget as budget_mod, engine, fit
from mixllm_jax.text import cache, domains, tags
from mixllm_jax.core.config import DEFAULT_DOMAINS, RouterConfig
from mixllm_jax.data import Dataset, ModelSpec
from mixllm_jax.offline.evaluate import choose_by_score
from mixllm_jax.core.latency import DEFAULT_MAX_CONCURRENCY, DEFAULT_TOKENS_PER_S, DEFAULT_TTFT_S
from mixllm_jax.core.observation import log_tokens
from mixllm_jax.core.policy import Policy, query_uniform
from mixllm_jax.text.router import Router, feature_groups
from mixllm_jax.core.state import ArmRegistry, add_llm, init_state

UPDATE_CHUNK = 8192


def embed(encoder, dataset: Dataset, max_length: int = 128, truncation_side: str = "left",
          cache_dir=None, progress: bool = True) -> np.ndarray:
    """Encoder embeddings of the dataset's prompts [N, H], through the on-disk cache."""
    return cache.embed_cached(encoder, dataset.prompts, max_length=max_length,
                              truncation_side=truncation_side, cache_dir=cache_dir, progress=progress)


def new_state(specs: Sequence[ModelSpec], dim: int, ridge: float | np.ndarray = 1.0):
    """An empty state and registry holding `specs` in order, capacity the next power of two."""
    capacity = 1 << max(1, (len(specs) - 1).bit_length())
    slots = max([s.max_concurrency or DEFAULT_MAX_CONCURRENCY for s in specs] + [32])
    state, reg = init_state(capacity, dim, load_slots=slots, ridge=ridge), ArmRegistry(capacity)
    for s in specs:
        state, reg = add_llm(state, reg, s.name, price_in=s.price_in, price_out=s.price_out,
                             ttft=s.ttft_s if s.ttft_s is not None else DEFAULT_TTFT_S,
                             tokens_per_s=s.tokens_per_s or DEFAULT_TOKENS_PER_S,
                             max_concurrency=s.max_concurrency or DEFAULT_MAX_CONCURRENCY)
    return state, reg


def fill_arms(state, registry: ArmRegistry, x: np.ndarray, dataset: Dataset, weight: float = 1.0,
              progress: bool = False):
    """Online-style fit: every (query, LLM) outcome with a known quality updates that LLM's arm and
    the shared online component (engine.update in chunks of UPDATE_CHUNK rows: what refined
    feedback does in the stream, in bulk)."""
    from mixllm_jax.util import progress as progress_mod

    q, lt = dataset.quality, log_tokens(dataset.completion_tokens)
    rows, cols = np.nonzero(np.isfinite(q))
    slots = registry.columns(dataset.models)
    targets = np.stack([q[rows, cols], lt[rows, cols]], 1)
    starts = range(0, len(rows), UPDATE_CHUNK)
    for i in progress_mod.bar(starts, desc="fill arms", unit="chunk", leave=False) if progress else starts:
        sl = slice(i, i + UPDATE_CHUNK)
        state = engine.update(state, x[rows[sl]], slots[cols[sl]], targets[sl],
                              np.full(len(rows[sl]), weight, np.float32))
    return state


def domain_tags(dataset: Dataset, e: np.ndarray, config: RouterConfig) -> list[tuple[str, ...]]:
    """The domains the head learns: the data's tags, or k-means clusters of e when the config asks
    for them or the log has no tags."""
    if config.domains is None and any(dataset.tags):
        return list(dataset.tags)
    return tags.kmeans_domains(e, config.domains or DEFAULT_DOMAINS,
                               seed=config.head.seed if config.head else 0)


def _with_head(dataset: Dataset, e: np.ndarray, encoder, config: RouterConfig, progress: bool) -> Router:
    """A Router with its domains (and, for features "head", its tag head trained); no arms yet."""
    head = None
    if config.head is not None:
        dom = domain_tags(dataset, e, config)
        head = tags.train_head(e, dom, dataset.quality, log_tokens(dataset.completion_tokens), config.head,
                               progress=progress) if config.features == "head" else tags.domain_head(e, dom)
        head = domains.with_spare(head, config.spare_domains)  # unopened slots for domains.DomainGrowth
    return Router(encoder=encoder, head=head, state=None, registry=None, config=config)


def _fit_arms(router: Router, empty, models: Sequence[str], stats, priors, prior_weight: float = 1.0) -> Router:
    """A copy of `router` whose arms (one per model of the empty (state, registry) of new_state) are
    filled from arm stats, each with the candidate prior precision of highest evidence among
    priors [C, d] (the log discounted to prior_weight pseudo-observations per query,
    fit.state_from_stats)."""
    state, registry = empty
    state, _ = fit.state_from_stats(state, registry.columns(models), stats, priors, prior_weight)
    return dataclasses.replace(router, state=state, registry=ArmRegistry.from_dict(registry.to_dict()))


def _feature_groups(router: Router, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """router.feature_groups of this router's features of dimension dim: (penalized [dim], domain [dim])."""
    h, c = router.head, router.config
    emb_dim = dim - 1 if h is None else int(np.shape(h.centroids)[1])
    return feature_groups(c.features, emb_dim, h and h.features, dim, c.spare_domains)


def prior_candidates(router: Router, dim: int) -> np.ndarray:
    """The config's candidate prior precisions [R * S, dim]: ridges x domain precisions."""
    penalized, domain = _feature_groups(router, dim)
    return fit.prior_grid(penalized, router.config.ridges, domain, router.config.domain_precisions)


def predictions(router: Router, e: np.ndarray, prompt_tokens: np.ndarray, models: Sequence[str],
                route=engine.route):
    """Predicted quality and cost (USD) of each LLM of `models` for embeddings e [N, H]: ([N, M], [N, M]),
    and each query's mixture draw u [N] (policy.query_uniform). route: `engine.route` or one with
    its signature (mesh.route on a mesh, see distributed.py)."""
    x = router.embed_features(e)
    d = route(router.state, x, prompt_tokens, Policy(alpha=0.0, beta=0.0, in_batch_load=False))
    cols = router.registry.columns(models)
    return np.asarray(d.quality)[:, cols], np.asarray(d.cost)[:, cols], np.asarray(query_uniform(x))


def sweep_choices(router: Router, e: np.ndarray, dataset: Dataset, cost_weights, route=engine.route) -> np.ndarray:
    """Choices [L, N] (dataset columns) of the router over a lambda grid, no exploration or load:
    one prediction pass, every lambda scored at once (evaluate.choose_by_score)."""
    q, c, _ = predictions(router, e, dataset.prompt_tokens, dataset.models, route)
    return choose_by_score(q, c, np.asarray(cost_weights, np.float64))


def policy_choices(router: Router, e: np.ndarray, dataset: Dataset, policy: Policy,
                   route=engine.route) -> np.ndarray:
    """Choices [N] (dataset columns) of one policy, its budget mixture included (offline: no load)."""
    q, c, u = predictions(router, e, dataset.prompt_tokens, dataset.models, route)
    a, b = choose_by_score(q, c, np.array([policy.cost_weight, policy.mix_cost_weight]))
    return np.where(u < policy.mix, b, a)


def train_router(dataset: Dataset, specs: Sequence[ModelSpec], encoder, config: RouterConfig = RouterConfig(), *,
                 policy: Policy = Policy(), cache_dir=None, embeddings: np.ndarray | None = None,
                 progress: bool = True, arm_stats=fit.arm_stats) -> Router:
    """Train a Router on logged outcomes and set its policy to the config's budget.

    With config.finetune the encoder is first fine-tuned on the log (finetune.finetune_encoder) and
    everything below runs on its embeddings; the returned router holds the fine-tuned encoder.
    The tag head is trained on all of train. With config.folds >= 2 the arms are cross-fitted: each
    fold is swept by arms fitted on the other folds (for each candidate ridge when the ridge is
    chosen on validation); the pooled curve of the best ridge is the OperatingCurve (budget.py), and
    the returned router's arms are fitted on all of train with that ridge.
    arm_stats: the statistics of a log, `fit.arm_stats` or one with its signature (the sharded ones
    of mesh.py and distributed.py: the same sums over devices and processes).
    """
    by_name = {s.name: s for s in specs}
    missing = [m for m in dataset.models if m not in by_name]
    if missing:
        raise ValueError(f"models {missing} of the data are not in the models file")
    if config.finetune is not None:
        if embeddings is not None:
            raise ValueError("embeddings cannot be given with config.finetune: they would be the base encoder's")
        from mixllm_jax.text import finetune

        encoder = finetune.finetune_encoder(encoder, dataset, config.finetune, max_length=config.max_length,
                                            truncation_side=config.truncation_side, domains=config.domains,
                                            cache_dir=cache_dir, progress=progress)
    e = embed(encoder, dataset, config.max_length, config.truncation_side, cache_dir, progress) \
        if embeddings is None else np.asarray(embeddings)
    router = _with_head(dataset, e, encoder, config, progress)
    x = np.asarray(router.embed_features(e))
    lt = log_tokens(dataset.completion_tokens)
    curve, priors = None, prior_candidates(router, x.shape[1])
    empty = new_state([by_name[m] for m in dataset.models], x.shape[1])  # one for every fit below
    if config.folds >= 2 and len(dataset) >= 5 * config.folds:
        fold = np.random.default_rng(0).permutation(len(dataset)) % config.folds
        candidates = list(priors[:, None]) if config.ridge_selection == "validation" else [priors]
        grid = budget_mod.CALIBRATION_GRID
        chosen = np.zeros((len(candidates), len(grid), len(dataset)), np.int32)
        from mixllm_jax.util import progress as progress_mod

        folds = range(config.folds)
        folds = progress_mod.bar(folds, desc="cross-fit the budget curve", unit="fold", leave=False) if progress else folds
        for f in folds:  # cross-fitted choices: each fold routed by arms fitted on the others
            rest, held = fold != f, fold == f
            stats = arm_stats(x[rest], dataset.quality[rest], lt[rest])
            for i, ps in enumerate(candidates):
                part = _fit_arms(router, empty, dataset.models, stats, ps)
                chosen[i][:, held] = sweep_choices(part, e[held], dataset.select(held), grid)
        curves = [budget_mod.curve_from_choices(ch, grid, dataset.quality, dataset.cost, dataset.models)
                  for ch in chosen]
        best = int(np.argmax([c.score() for c in curves]))
        curve, priors = curves[best], candidates[best]
    elif config.ridge_selection == "validation":
        raise ValueError(f"choosing the ridge on validation needs cross-fitting: {len(dataset)} queries are too "
                         f"few for {config.folds} folds; use ridge_selection='evidence'")
    router = _fit_arms(router, empty, dataset.models, arm_stats(x, dataset.quality, lt), priors, config.prior_weight)
    router.curve = curve
    router.policy = router.policy_for(config.budget, policy)
    return router


def summary(router: Router, dataset: Dataset, e: np.ndarray) -> dict:
    """What a trained router learnt, on its training log (embeddings e [N, H]): the domains and how
    many queries each is nearest to, each LLM's in-sample fit error (quality RMSE over its scored
    queries, predicted / logged total cost), and the operating point.

    Returns {"domains": {name: n} | None, "fit": {llm: {"quality_rmse", "cost_ratio", "n"}},
    "budget": str, "cost_weight", "mix_cost_weight", "mix", "held_out": {"spend_usd", "quality"} | None,
    "ridge", "domain_precision": the prior precisions the fit chose (median over arms; None: no such
    features)}.
    """
    q_hat, c_hat, _ = predictions(router, e, dataset.prompt_tokens, dataset.models)
    fit_err = {}
    for j, m in enumerate(dataset.models):
        ok = np.isfinite(dataset.quality[:, j])
        fit_err[m] = {"n": int(ok.sum()),
                      "quality_rmse": float(np.sqrt(np.mean((q_hat[ok, j] - dataset.quality[ok, j]) ** 2)))
                      if ok.any() else None,
                      "cost_ratio": float(c_hat[ok, j].sum() / dataset.cost[ok, j].sum())
                      if ok.any() and dataset.cost[ok, j].sum() > 0 else None}
    domains_n = None
    if router.head is not None:
        (params, centroids), static = router.head_args()
        from mixllm_jax.text.router import featurize

        _, nearest = featurize(e, params, centroids, **static)
        counts = np.bincount(np.asarray(nearest), minlength=len(router.head.tags))
        domains_n = {t: int(n) for t, n in zip(router.head.tags, counts) if n or not t.startswith("new-")}
    p, held = router.policy, None
    if router.curve is not None:
        c = router.curve
        spend = (1 - p.mix) * _curve_at(c, p.cost_weight, "spend") + p.mix * _curve_at(c, p.mix_cost_weight, "spend")
        quality = (1 - p.mix) * _curve_at(c, p.cost_weight, "quality") + p.mix * _curve_at(c, p.mix_cost_weight,
                                                                                          "quality")
        held = {"spend_usd": spend, "quality": quality, "n_queries": c.n_queries}
    prior = np.asarray(router.state.ridge)
    penalized, domain = _feature_groups(router, prior.shape[0])
    chosen = {"ridge": float(prior[penalized][0]) if penalized.any() else None,
              "domain_precision": float(prior[domain][0]) if domain.any() else None}
    return {"domains": domains_n, "fit": fit_err, "budget": router.config.budget.describe(), **chosen,
            "cost_weight": float(p.cost_weight), "mix_cost_weight": float(p.mix_cost_weight), "mix": float(p.mix),
            "held_out": held}


def _curve_at(curve, cost_weight: float, field: str) -> float:
    """The curve's `field` (spend or quality) at its setting nearest to cost_weight."""
    i = int(np.argmin(np.abs(np.asarray(curve.cost_weights) - cost_weight)))
    return float(getattr(curve, field)[i])

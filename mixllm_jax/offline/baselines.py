"""Baseline routers (RouterBench / MixLLM paper) on the same query embeddings as the router.

One interface for all of them::

    router.fit(E_train [N, D], quality [N, M], cost [N, M], tags [N]) -> router
    router.choose(E [N, D], knob, tags=None) -> chosen [N] int model index
    router.sweep(E [N, D], knobs, tags=None) -> chosen [L, N]

The knob is the cost weight lambda (quality per USD) for every router that predicts per-model
quality and cost (``predict(E, tags) -> (q_hat [N, M], c_hat [N, M])``, then the shared rule
:func:`mixllm_jax.offline.evaluate.choose_by_score`: argmax ``q_hat - lambda * c_hat``, ties to the lower
cost). :class:`RandomMix`'s knob is its mixing probability; :class:`SingleLLM` has none.

:func:`run_baselines` fits them all on a train split and returns their test sweeps, ready for
:func:`mixllm_jax.offline.evaluate.evaluate`. NaN outcomes in training data (unscored calls) are left out
of every mean and fit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mixllm_jax.offline.evaluate import COST_WEIGHTS, Sweep, choose_by_score, task_keys

__all__ = [
    "Baseline",
    "SingleLLM",
    "RandomMix",
    "Oracle",
    "PerTaskBest",
    "KNNRouter",
    "MLPRouter",
    "RidgeRouter",
    "run_baselines",
    "one_hot_task_embeddings",
]


def _nanmean0(x: np.ndarray) -> np.ndarray:
    """Column means ignoring NaN ([N, M] -> [M]); NaN where a column has no value."""
    ok = ~np.isnan(x)
    return np.where(ok, x, 0.0).sum(0) / np.where(ok.sum(0) > 0, ok.sum(0), np.nan)


def _check_fit(E, quality, cost):
    E = np.asarray(E, np.float32)
    q = np.asarray(quality, np.float64)
    c = np.asarray(cost, np.float64)
    if E.ndim != 2 or q.ndim != 2 or q.shape != c.shape or q.shape[0] != E.shape[0]:
        raise ValueError(f"fit needs E [N, D], quality and cost [N, M]; got {E.shape}, {q.shape}, "
                         f"{c.shape}")
    return E, q, c


class Baseline:
    """Base: a router that predicts per-model quality and cost and picks by the shared rule."""

    knob: str | None = "cost_weight"

    def fit(self, E, quality, cost, tags=None) -> "Baseline":
        return self

    def predict(self, E, tags=None) -> tuple[np.ndarray, np.ndarray]:
        """q_hat [N, M], c_hat [N, M] for queries E [N, D]."""
        raise NotImplementedError

    def sweep(self, E, cost_weights=COST_WEIGHTS, tags=None) -> np.ndarray:
        """chosen [L, N]: one prediction, one decision per cost weight."""
        q_hat, c_hat = self.predict(E, tags)
        return choose_by_score(q_hat, c_hat, np.atleast_1d(cost_weights))

    def choose(self, E, cost_weight, tags=None) -> np.ndarray:
        """chosen [N] at one cost weight."""
        return self.sweep(E, [cost_weight], tags)[0]


class SingleLLM(Baseline):
    """Always the same LLM (one operating point)."""

    knob = None

    def __init__(self, index: int):
        self.index = int(index)

    def sweep(self, E, cost_weights=None, tags=None) -> np.ndarray:
        """chosen [1, N]: the knob is ignored."""
        return np.full((1, len(E)), self.index, np.int32)

    def choose(self, E, cost_weight=None, tags=None) -> np.ndarray:
        return self.sweep(E)[0]


class RandomMix(Baseline):
    """Per query, the best-on-train LLM with probability p, else the cheapest-on-train LLM.

    The knob is p. A sweep uses one fixed draw u [N] (seeded) for every p, so the choice moves
    from cheap to best query by query as p grows (and the sweep is monotone).
    """

    knob = "mix_prob"

    def __init__(self, probs: Sequence[float] = tuple(np.linspace(0.0, 1.0, 21)), seed: int = 0):
        self.probs, self.seed = tuple(float(p) for p in probs), seed

    def fit(self, E, quality, cost, tags=None) -> "RandomMix":
        _, q, c = _check_fit(E, quality, cost)
        self.best = int(np.nanargmax(_nanmean0(q)))
        self.cheap = int(np.nanargmin(_nanmean0(c)))
        return self

    def sweep(self, E, probs=None, tags=None) -> np.ndarray:
        """chosen [P, N] for the mixing probabilities ``probs`` (default ``self.probs``)."""
        p = np.atleast_1d(np.asarray(self.probs if probs is None else probs, np.float64))
        u = np.random.default_rng(self.seed).random(len(E))
        return np.where(u[None, :] < p[:, None], self.best, self.cheap).astype(np.int32)

    def choose(self, E, prob, tags=None) -> np.ndarray:
        return self.sweep(E, [prob])[0]


class Oracle(Baseline):
    """Knows the true test outcomes: argmax of true ``q - lambda * c`` (lambda = 0: the best
    quality, ties to the cheapest). An upper bound, not a router. ``fit`` ignores its arguments."""

    def __init__(self, quality_test, cost_test):
        self.q = np.asarray(quality_test, np.float64)
        self.c = np.asarray(cost_test, np.float64)

    def predict(self, E, tags=None):
        if len(E) != self.q.shape[0]:
            raise ValueError(f"Oracle holds {self.q.shape[0]} queries' outcomes, asked for {len(E)}")
        return self.q, self.c


class PerTaskBest(Baseline):
    """Per task (tags joined, see :func:`task_keys`), the train mean quality and cost of each LLM.

    Needs the test queries' tags; a task not seen in training gets the overall means. Embeddings
    are not used.
    """

    def fit(self, E, quality, cost, tags=None) -> "PerTaskBest":
        _, q, c = _check_fit(E, quality, cost)
        if tags is None:
            raise ValueError("PerTaskBest.fit needs tags")
        keys = np.asarray(task_keys(tags), dtype=object)
        self.tasks = {t: i for i, t in enumerate(dict.fromkeys(keys.tolist()))}
        ids = np.array([self.tasks[k] for k in keys])
        self.q_task = np.stack([_nanmean0(q[ids == i]) for i in range(len(self.tasks))])  # [T, M]
        self.c_task = np.stack([_nanmean0(c[ids == i]) for i in range(len(self.tasks))])
        self.q_all, self.c_all = _nanmean0(q), _nanmean0(c)
        return self

    def predict(self, E, tags=None):
        if tags is None:
            raise ValueError("PerTaskBest.predict needs the queries' tags")
        keys = task_keys(tags)
        ids = np.array([self.tasks.get(k, -1) for k in keys])
        q_tab = np.vstack([self.q_task, self.q_all[None]])  # row -1 = unseen task
        c_tab = np.vstack([self.c_task, self.c_all[None]])
        return q_tab[ids], c_tab[ids]


def _normalise(E) -> np.ndarray:
    E = np.asarray(E, np.float32)
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


class KNNRouter(Baseline):
    """k nearest training queries by cosine similarity; q_hat, c_hat = their means per LLM.

    Ties at the k-th similarity are all included (so identical embeddings, e.g. one-hot task
    vectors, average over their whole group rather than an arbitrary k of it).
    """

    def __init__(self, k: int = 20, block: int = 2048):
        self.k, self.block = int(k), int(block)

    def fit(self, E, quality, cost, tags=None) -> "KNNRouter":
        E, q, c = _check_fit(E, quality, cost)
        self.E = _normalise(E)
        self.ok_q, self.ok_c = ~np.isnan(q), ~np.isnan(c)
        self.q, self.c = np.where(self.ok_q, q, 0.0), np.where(self.ok_c, c, 0.0)
        return self

    def predict(self, E, tags=None):
        X = _normalise(E)
        k = min(self.k, self.E.shape[0])
        q_hat = np.empty((len(X), self.q.shape[1]))
        c_hat = np.empty_like(q_hat)
        for s in range(0, len(X), self.block):  # blocks of queries bound the [B, N_train] memory
            sim = X[s:s + self.block] @ self.E.T
            kth = np.partition(sim, -k, axis=1)[:, -k:].min(axis=1, keepdims=True)
            W = (sim >= kth - 1e-6).astype(np.float64)  # [B, N_train]
            with np.errstate(invalid="ignore", divide="ignore"):
                q_hat[s:s + self.block] = (W @ self.q) / (W @ self.ok_q)
                c_hat[s:s + self.block] = (W @ self.c) / (W @ self.ok_c)
        return q_hat, c_hat


class MLPRouter(Baseline):
    """An MLP (jax + optax) from E to every LLM's quality (sigmoid outputs, cross-entropy on
    the observed cells); cost = each LLM's mean train cost. Minibatch AdamW with a cosine
    learning-rate decay, fixed seed."""

    def __init__(self, hidden: int = 128, steps: int = 500, batch: int = 256, lr: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int = 0):
        self.hidden, self.steps, self.batch = hidden, steps, batch
        self.lr, self.wd, self.seed = lr, weight_decay, seed

    def fit(self, E, quality, cost, tags=None) -> "MLPRouter":
        import jax

        E, q, c = _check_fit(E, quality, cost)
        d, m = E.shape[1], q.shape[1]
        rng = np.random.default_rng(self.seed)
        q_mean = np.clip(_nanmean0(q), 1e-3, 1 - 1e-3)
        params = {"w1": (rng.normal(size=(d, self.hidden)) * np.sqrt(2.0 / d)).astype(np.float32),
                  "b1": np.zeros(self.hidden, np.float32),
                  "w2": (rng.normal(size=(self.hidden, m)) / np.sqrt(self.hidden)).astype(np.float32),
                  "b2": np.log(q_mean / (1 - q_mean)).astype(np.float32)}  # start at the means
        params = _train_mlp(params, E, np.nan_to_num(q).astype(np.float32),
                            (~np.isnan(q)).astype(np.float32), jax.random.PRNGKey(self.seed),
                            self.steps, min(self.batch, len(E)), self.lr, self.wd)
        self.params = jax.tree_util.tree_map(np.asarray, params)
        self.c_mean = _nanmean0(c)
        return self

    def predict(self, E, tags=None):
        z = _mlp_logits(self.params, np.asarray(E, np.float32))
        q_hat = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
        return q_hat, np.broadcast_to(self.c_mean, q_hat.shape)


def _mlp_logits(p, x):
    """[N, D] -> [N, M]; works on numpy and jax arrays alike."""
    h = x @ p["w1"] + p["b1"]
    return (h * (h > 0)) @ p["w2"] + p["b2"]


def _train_mlp(params, x, y, mask, key, steps, batch, lr, wd):
    """``steps`` AdamW steps on random minibatches, one jitted ``lax.scan`` (compiled once per
    shape and hyper-parameters). x [N, D], y and mask [N, M]."""
    global _TRAIN_MLP
    if _TRAIN_MLP is None:
        import functools

        import jax
        import optax

        @functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
        def train(params, x, y, mask, key, steps, batch, lr, wd):
            opt = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.01), weight_decay=wd)

            def loss(p, idx):
                ce = optax.sigmoid_binary_cross_entropy(_mlp_logits(p, x[idx]), y[idx])
                return (ce * mask[idx]).sum() / mask[idx].sum().clip(1.0)

            def step(carry, k):
                p, s = carry
                idx = jax.random.randint(k, (batch,), 0, x.shape[0])
                upd, s = opt.update(jax.grad(loss)(p, idx), s, p)
                return (optax.apply_updates(p, upd), s), None

            return jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))[0][0]

        _TRAIN_MLP = train
    return _TRAIN_MLP(params, x, y, mask, key, steps, batch, lr, wd)


_TRAIN_MLP = None


class RidgeRouter(Baseline):
    """Linear ridge regression of every LLM's quality and cost on [E, 1] (closed form, no
    exploration). NaN targets are replaced by their column's mean before fitting."""

    def __init__(self, ridge: float = 1.0):
        self.ridge = float(ridge)

    def fit(self, E, quality, cost, tags=None) -> "RidgeRouter":
        E, q, c = _check_fit(E, quality, cost)
        X = np.hstack([E.astype(np.float64), np.ones((len(E), 1))])
        Y = np.hstack([q, c])
        Y = np.where(np.isnan(Y), _nanmean0(Y)[None], Y)
        A = X.T @ X + self.ridge * np.eye(X.shape[1])
        self.W = np.linalg.solve(A, X.T @ Y)  # [D + 1, 2M]
        self.m = q.shape[1]
        return self

    def predict(self, E, tags=None):
        X = np.hstack([np.asarray(E, np.float64), np.ones((len(E), 1))])
        Y = X @ self.W
        return Y[:, :self.m], Y[:, self.m:]


def one_hot_task_embeddings(tags_train, tags_test=None) -> tuple[np.ndarray, ...]:
    """One-hot of each query's task (tasks indexed in order of first appearance in train;
    a test task unseen in train gets the zero vector). Returns E_train [N, T] (, E_test)."""
    keys_tr = task_keys(tags_train)
    idx = {t: i for i, t in enumerate(dict.fromkeys(keys_tr))}

    def enc(keys):
        E = np.zeros((len(keys), len(idx)), np.float32)
        ids = np.array([idx.get(k, -1) for k in keys])
        E[np.flatnonzero(ids >= 0), ids[ids >= 0]] = 1.0
        return E

    out = (enc(keys_tr),) if tags_test is None else (enc(keys_tr), enc(task_keys(tags_test)))
    return out


def run_baselines(E_train, train, E_test, test, cost_weights=None, k: int = 20, seed: int = 0,
                  include: Sequence[str] | None = None) -> dict[str, Sweep]:
    """Fit every baseline on ``train`` and sweep it on ``test`` (both :class:`Dataset`, same models).

    Returns ``{name: Sweep}``: ``oracle``, ``random_mix``, ``per_task_best``, ``knn``, ``mlp``,
    ``ridge``, and one single-LLM point per model (named after the model). ``include`` limits the
    routers (single LLMs are always included).
    """
    if list(train.models) != list(test.models):
        raise ValueError("train and test must have the same models in the same order")
    cws = list(np.asarray(COST_WEIGHTS if cost_weights is None else cost_weights, np.float64))
    routers: dict[str, Baseline] = {
        "oracle": Oracle(test.quality, test.cost),
        "random_mix": RandomMix(seed=seed),
        "per_task_best": PerTaskBest(),
        "knn": KNNRouter(k=k),
        "mlp": MLPRouter(seed=seed),
        "ridge": RidgeRouter(),
    }
    if include is not None:
        routers = {n: r for n, r in routers.items() if n in include}
    out: dict[str, Sweep] = {}
    for name, r in routers.items():
        r.fit(E_train, train.quality, train.cost, train.tags)
        if r.knob == "cost_weight":
            out[name] = Sweep(r.sweep(E_test, cws, test.tags), cws, "cost_weight")
        else:
            out[name] = Sweep(r.sweep(E_test, None, test.tags), list(r.probs), r.knob)
    for j, m in enumerate(test.models):
        out[m] = Sweep(SingleLLM(j).sweep(E_test), None, None)
    return out

"""Domains that grow: queries far from every domain centroid open a new domain online.

A router trained with `RouterConfig(spare_domains=S)` has S spare domain slots: its head holds
G + S centroids, the last S all zero ("unopened": `router.featurize` never assigns a query to a
zero centroid), and its features (`raw+domain`) carry G + S domain columns, so the bandit state
has an intercept per spare domain from the start (zero in the offline log, prior precision
`fit.INTERCEPT_PRECISION`: an opened domain's intercepts are free, and wide, for every arm).

`DomainGrowth` watches the stream in arrival order. For each query, the cosine of its embedding e
to every live centroid (the G trained ones and those opened so far; centroids live in the
encoder's embedding space, tags.TrainedHead):

* far: cosine < `threshold` to every trained centroid (by default the `quantile` (1%) of the
  training queries' cosine to their nearest centroid) and < 2 threshold^2 - 1 to every opened one
  (two queries each within the threshold of one centre can be that far apart: an opened domain
  starts as a single query), and a spare slot is left -> the query waits among the pending far
  queries; once `min_members` (3) pending queries are within 2 threshold^2 - 1 of each other, a
  new domain opens at their mean (so one outlier of a trained domain opens nothing);
* it then belongs to its nearest live centroid (the new one when it just opened);
* an opened domain's centroid moves to the running mean of its queries' unit embeddings (online
  k-means; trained centroids never move, they define what the offline fit saw).

The query's features use the domain as it is when the query arrives, exactly what an online
router would compute; the opened centroids are written back into the router's head
(`apply_to`), so later routing and evaluation see the grown domains. Opening a domain changes no
shape and recompiles nothing. See docs/architecture.md, "Online learning".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixllm_jax.text import tags
from mixllm_jax.text.router import DOMAIN_SCALE, Router

DEFAULT_QUANTILE = 0.01


def with_spare(head: tags.TrainedHead, spare: int) -> tags.TrainedHead:
    """The head with `spare` zero (unopened) centroids after its G trained ones."""
    if spare <= 0:
        return head
    c = np.asarray(head.centroids, np.float32)
    pad = np.zeros((spare, c.shape[1]), np.float32)
    names = tuple(head.tags) + tuple(f"new-{i}" for i in range(spare))
    return head._replace(tags=names, centroids=np.concatenate([c, pad]))


def _unit(z: np.ndarray) -> np.ndarray:
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-6)


@dataclasses.dataclass
class DomainGrowth:
    """The growing set of domains of a router with spare slots (see the module docstring).

    centroids [G + S, H]: trained, opened and unopened (zero) rows; n_trained = G; counts [G + S]
    queries seen per opened domain; threshold: the cosine below which a query opens a domain.
    """

    centroids: np.ndarray
    n_trained: int
    threshold: float
    counts: np.ndarray
    min_members: int = 3
    opened_at: list = dataclasses.field(default_factory=list)  # stream index of each opening
    pending: list = dataclasses.field(default_factory=list)  # unit features of far queries not yet in a domain

    @property
    def n_open(self) -> int:
        return int((np.linalg.norm(self.centroids[self.n_trained:], axis=1) > 0).sum())

    @property
    def spare(self) -> int:
        return len(self.centroids) - self.n_trained

    @classmethod
    def from_router(cls, router: Router, e_train: np.ndarray, quantile: float = DEFAULT_QUANTILE,
                    threshold: float | None = None, min_members: int = 3) -> "DomainGrowth":
        """The growth state of a router trained with spare domains; the threshold is the
        `quantile` of the training queries' cosine to their nearest trained centroid (or given)."""
        head = router.head
        if head is None or router.feature_mode != "raw+domain":
            raise ValueError("domains grow only with the tag head and features 'raw+domain'")
        c = np.asarray(head.centroids, np.float32)
        live = np.linalg.norm(c, axis=1) > 0
        n_trained = int(np.flatnonzero(live).max()) + 1 if live.any() else 0
        if n_trained == len(c):
            raise ValueError("the router has no spare domain slot: train it with RouterConfig(spare_domains=S)")
        if threshold is None:
            u = _unit(np.asarray(e_train, np.float32))
            threshold = float(np.quantile((u @ _unit(c[:n_trained]).T).max(1), quantile))
        return cls(centroids=c.copy(), n_trained=n_trained, threshold=float(threshold), counts=np.zeros(len(c)),
                   min_members=int(min_members))

    def observe(self, e: np.ndarray, start: int = 0) -> np.ndarray:
        """Process queries' embeddings e [N, H] in order: open and move domains; returns each
        query's domain [N] as it was when the query arrived. `start`: the stream index of e[0]."""
        u = _unit(np.asarray(e, np.float32))
        out = np.zeros(len(u), np.int64)
        for i, ui in enumerate(u):
            live = np.linalg.norm(self.centroids, axis=1) > 0
            cos = np.where(live, _unit(self.centroids) @ ui, -np.inf)
            far = (cos[:self.n_trained].max(initial=-np.inf) < self.threshold
                   and cos[self.n_trained:].max(initial=-np.inf) < 2 * self.threshold ** 2 - 1)
            if far and not live.all():
                near = 2 * self.threshold ** 2 - 1
                group = [p for p in self.pending if p @ ui >= near]
                if len(group) + 1 >= self.min_members:
                    j = int(np.flatnonzero(~live)[0])
                    self.centroids[j] = np.mean(group, axis=0)  # the current query joins it below
                    self.counts[j] = len(group)
                    self.pending = [p for p in self.pending if p @ ui < near]
                    self.opened_at.append({"domain": j, "at": start + i, "cosine": float(cos.max()),
                                           "members": len(group) + 1})
                    cos[j] = 2.0
                else:
                    self.pending.append(ui)
            k = int(np.argmax(cos))
            out[i] = k
            if k >= self.n_trained:  # an opened domain follows its queries
                self.counts[k] += 1
                self.centroids[k] += (ui - self.centroids[k]) / self.counts[k]
        return out

    def stream_features(self, router: Router, e: np.ndarray, start: int = 0) -> np.ndarray:
        """Bandit features [N, d] of a stream's embeddings e [N, H] in arrival order, with domains
        opened and moved as the stream goes (each query's domain as of its arrival)."""
        dom = self.observe(e, start)
        onehot = DOMAIN_SCALE * np.eye(len(self.centroids), dtype=np.float32)[dom]
        return np.concatenate([np.asarray(e, np.float32), onehot, np.ones((len(e), 1), np.float32)], 1)

    def apply_to(self, router: Router) -> Router:
        """A copy of the router whose head holds the grown centroids (for routing after the stream)."""
        head = router.head._replace(centroids=self.centroids.copy())
        return dataclasses.replace(router, head=head)

    def summary(self) -> dict:
        return {"threshold": self.threshold, "spare": self.spare, "opened": self.n_open,
                "opened_at": list(self.opened_at),
                "queries_per_opened_domain": [int(c) for c in self.counts[self.n_trained:]]}

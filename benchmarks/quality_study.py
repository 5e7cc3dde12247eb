"""Which per-query signals improve routing decisions, chosen on validation, on both shared data sets.

    python -m benchmarks.quality_study [--out runs/quality-study]

`mixllm-jax ablation` compares the package's own options; this study also tries signals the
package does not ship, to show what they would add. Every variant is one ridge per LLM over
[signal, 3 * one-hot(domain), 1] (intercepts unshrunk, the package's predictor in closed form, numpy)
on the default encoder's cached embeddings:

  ridge R            embedding, domain = nearest of the tags' mean embeddings (the package's default);
                     R = 1e6 leaves only the per-domain means: a per-task lookup table
  head domains       the same with the domain read off the tag head's centroids (format 3 checkpoints);
                     the head is trained on each fold's fit part only
  kNN blend          0.7 x ridge 100 + 0.3 x the mean outcomes of the 100 nearest training queries
  shared latent      ridge plus the top-2 directions of the ridge's fitted outcomes (all LLMs share
                     them: a difficulty axis), cross-fitted on the fit part
  TF-IDF             ridge on [embedding, 256 SVD components of word 1-2-gram TF-IDF] (needs
                     scikit-learn, which the bench extra brings; skipped without it)

Validation: 5 folds of train, each predicted by a fit on the other four. Test (and routerdc7's
unseen tasks, `ood`) beside it, never used to choose. RouterBench: AIQ (% of GPT-4, c_max 100%, the
cost predicted by a ridge 100 on log cost, the same for every variant); routerdc7: task-mean
quality % at cost weight 0 (all its LLMs cost the same). Writes quality-study.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mixllm_jax.text import cache, encoder as enc_mod, tags
from mixllm_jax import data
from mixllm_jax.core import metrics
from mixllm_jax.util import paths
from mixllm_jax.core.config import HeadConfig
from mixllm_jax.offline.evaluate import choose_by_score
from mixllm_jax.text.router import DOMAIN_SCALE
from mixllm_jax.core.observation import log_tokens

LAMBDAS = np.concatenate([[0.0], np.logspace(-1, 7, 161)])
FOLDS = 5


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def _ridge(xa, ya, xb, lam, n_pen):
    """Predictions at xb of a ridge fitted on (xa, ya): the first n_pen columns shrunk by lam."""
    pen = np.where(np.arange(xa.shape[1]) < n_pen, lam, 1e-3)
    return xb @ np.linalg.solve(xa.T @ xa + np.diag(pen), xa.T @ np.nan_to_num(ya))


class Part:
    """One split: embeddings e [N, H], task names, the dataset."""

    def __init__(self, ds, e):
        self.ds, self.e = ds, _unit(np.asarray(e, np.float64))
        self.task = np.array([t[0] for t in ds.tags])

    def select(self, rows):
        p = Part.__new__(Part)
        p.ds, p.e, p.task = self.ds.select(rows), self.e[rows], self.task[rows]
        return p


def _domains(fit: Part, parts, space: str):
    """One-hot domain [N, G] of each part's queries: nearest tag centroid in the embedding or head space."""
    names = sorted(set(fit.task))
    if space == "embedding":
        c = _unit(np.stack([fit.e[fit.task == t].mean(0) for t in names]))
        return [np.eye(len(names))[np.argmax(p.e @ c.T, 1)] for p in parts]
    head = tags.train_head(fit.e.astype(np.float32), [(t,) for t in fit.task], fit.ds.quality,
                           log_tokens(fit.ds.completion_tokens), HeadConfig())
    z = [_unit(np.asarray(tags.apply_head(head, p.e.astype(np.float32)))) for p in (fit, *parts)]
    c = _unit(np.stack([z[0][fit.task == t].mean(0) for t in names]))
    return [np.eye(len(names))[np.argmax(zp @ c.T, 1)] for zp in z[1:]]


def _tfidf(fit: Part, parts):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2), max_features=50000).fit(fit.ds.prompts)
    svd = TruncatedSVD(256, random_state=0).fit(vec.transform(fit.ds.prompts))
    return [_unit(svd.transform(vec.transform(p.ds.prompts))) for p in parts]


def _latent(fit: Part, dom_fit, parts, dom_parts, r=2):
    """Top-r shared directions of the ridge 100's fitted outcomes, cross-fitted for the fit part."""
    def project(a_e, a_dom, a_q, b_e):
        x = np.hstack([a_e, DOMAIN_SCALE * a_dom, np.ones((len(a_e), 1))])
        w = np.linalg.solve(x.T @ x + np.diag(np.where(np.arange(x.shape[1]) < a_e.shape[1], 100.0, 1e-3)),
                            x.T @ np.nan_to_num(a_q))[: a_e.shape[1]]
        fitted = a_e @ w
        mu = fitted.mean(0)
        v = np.linalg.svd(fitted - mu, full_matrices=False)[2][:r].T
        return (b_e @ w - mu) @ v
    q = fit.ds.quality
    fold = np.random.default_rng(1).permutation(len(fit.e)) % FOLDS
    z_fit = np.zeros((len(fit.e), r))
    for k in range(FOLDS):
        a, b = fold != k, fold == k
        z_fit[b] = project(fit.e[a], dom_fit[a], q[a], fit.e[b])
    s = z_fit.std(0) + 1e-9
    return z_fit / s, [project(fit.e, dom_fit, q, p.e) / s for p in parts]


def predict(variant: str, fit: Part, parts) -> list[np.ndarray]:
    """Each part's predicted quality [N, M] by the variant fitted on `fit`."""
    space = "head" if variant == "head domains" else "embedding"
    dom_fit, *dom_parts = _domains(fit, [fit, *parts], space)
    sig_fit, sig_parts, lam = fit.e, [p.e for p in parts], 100.0
    if variant.startswith("ridge "):
        lam = float(variant.split()[1])
    elif variant == "TF-IDF":
        t_fit, *t_parts = _tfidf(fit, [fit, *parts])
        sig_fit, sig_parts = np.hstack([fit.e, t_fit]), [np.hstack([p.e, t]) for p, t in zip(parts, t_parts)]
    elif variant == "shared latent":
        z_fit, z_parts = _latent(fit, dom_fit, parts, dom_parts)
        dom_fit, dom_parts = np.hstack([dom_fit, z_fit / DOMAIN_SCALE]), [np.hstack([d, z / DOMAIN_SCALE])
                                                                         for d, z in zip(dom_parts, z_parts)]
    n = sig_fit.shape[1]
    feats = lambda s, d: np.hstack([s, DOMAIN_SCALE * d, np.ones((len(s), 1))])  # noqa: E731
    out = [_ridge(feats(sig_fit, dom_fit), fit.ds.quality, feats(s, d), lam, n) for s, d in zip(sig_parts, dom_parts)]
    if variant == "kNN blend":
        for i, p in enumerate(parts):
            sim = p.e @ fit.e.T
            nn = np.argpartition(-sim, 100, axis=1)[:, :100]
            out[i] = 0.7 * out[i] + 0.3 * np.nan_to_num(fit.ds.quality)[nn].mean(1)
    return out


def _cost_hat(fit: Part, parts):
    dom_fit, *dom_parts = _domains(fit, [fit, *parts], "embedding")
    feats = lambda p, d: np.hstack([p.e, DOMAIN_SCALE * d, np.ones((len(p.e), 1))])  # noqa: E731
    y = np.log(np.maximum(fit.ds.cost, 1e-12))
    return [np.exp(_ridge(feats(fit, dom_fit), y, feats(p, d), 100.0, fit.e.shape[1])) for p, d in zip(parts, dom_parts)]


def score(part: Part, q_hat, c_hat, ref: int | None) -> float:
    """AIQ (% of the reference, c_max 100) when ref is given, else task-mean quality % at cost weight 0."""
    q = np.nan_to_num(part.ds.quality)
    rows = np.arange(len(q))
    if ref is None:
        got = q[rows, np.argmax(q_hat, 1)]
        return float(100 * np.mean([got[part.task == t].mean() for t in np.unique(part.task)]))
    ch = choose_by_score(q_hat, c_hat, LAMBDAS)
    cost = 100 * part.ds.cost[rows, ch].sum(1) / part.ds.cost[:, ref].sum()
    qual = 100 * q[rows, ch].sum(1) / q[:, ref].sum()
    return float(metrics.aiq(cost, qual, c_max=100.0))


def study(name: str, train: Part, tests: dict, ref: int | None, variants) -> dict:
    fold = np.random.default_rng(0).permutation(len(train.e)) % FOLDS
    splits = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(FOLDS)]
    val_c, test_c = None, [None] * len(tests)
    if ref is not None:  # one cost predictor for every variant
        val_c = np.zeros(train.ds.cost.shape)
        for a, b in splits:
            val_c[b] = _cost_hat(train.select(a), [train.select(b)])[0]
        test_c = _cost_hat(train, list(tests.values()))
    rows = {}
    for v in variants:
        val_q = np.zeros(train.ds.quality.shape)
        for a, b in splits:
            val_q[b] = predict(v, train.select(a), [train.select(b)])[0]
        test_q = predict(v, train, list(tests.values()))
        rows[v] = {"validation": score(train, val_q, val_c, ref),
                   **{t: score(p, qh, ch, ref) for (t, p), qh, ch in zip(tests.items(), test_q, test_c)}}
        print(name, v, {k: round(x, 2) for k, x in rows[v].items()}, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quality-study")
    args = ap.parse_args(argv)
    enc = enc_mod.load_encoder(None)
    embed = lambda ds: cache.embed_cached(enc, ds.prompts, max_length=128, truncation_side="left", progress=False)  # noqa: E731
    variants = ["ridge 30", "ridge 100", "ridge 300", "ridge 1e6", "head domains", "kNN blend", "shared latent"]
    try:
        import sklearn  # noqa: F401
        variants.append("TF-IDF")
    except ImportError:
        print("scikit-learn is not installed (pip install -e '.[bench]'): TF-IDF skipped")
    rb = {s: data.load_routerbench(split=s) for s in ("train", "test")}
    rb = {s: Part(ds, embed(ds)) for s, ds in rb.items()}
    dc_dir = paths.shared_dir() / "data" / "routerdc7"
    dc = data.load_jsonl(dc_dir / "data.jsonl.gz", dc_dir / "models.json").by_split()
    dc = {s: Part(ds, embed(ds)) for s, ds in dc.items()}
    result = {
        "routerbench (AIQ)": study("routerbench", rb["train"], {"test": rb["test"]},
                                   list(rb["train"].ds.models).index("gpt-4-1106-preview"), variants),
        "routerdc7 (task-mean quality)": study("routerdc7", dc["train"], {"test": dc["test"], "ood": dc["ood"]},
                                               None, variants),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-study.json").write_text(json.dumps(result, indent=1))
    lines = []
    for name, rows in result.items():
        cols = list(next(iter(rows.values())))
        lines += [f"### {name}", "", "| variant | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
        lines += [f"| {v} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for v, r in rows.items()] + [""]
    (out / "quality-study.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

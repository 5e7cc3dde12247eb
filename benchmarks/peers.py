"""The peers the suite measures beside the engine, when installed (`pip install -e '.[bench]'`).

- MABWiser's LinUCB (`mabwiser`): `MAB.predict` on a batch of contexts, `MAB.partial_fit` one
  observation at a time. It keeps one float64 ridge regression per arm and recomputes the inverse
  with `np.linalg.inv` on every fit.
- sentence-transformers on torch CPU (`sentence-transformers`, `torch`): the same MiniLM weights
  (the folder `mixllm_jax.text.encoder.resolve_encoder()` finds), encoding text to embeddings.

Each `find_*` returns (version string, None) or (None, why it is not available); nothing here
raises on a missing package.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import numpy as np


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def find_mabwiser() -> tuple[str | None, str | None]:
    try:
        importlib.import_module("mabwiser.mab")
    except Exception as e:  # ImportError, or a broken install
        return None, f"mabwiser not importable ({type(e).__name__}: {e}); install the `bench` extra"
    return _version("mabwiser"), None


def find_sentence_transformers() -> tuple[str | None, str | None]:
    try:
        importlib.import_module("torch")
        importlib.import_module("sentence_transformers")
    except Exception as e:
        return None, (f"sentence-transformers/torch not importable ({type(e).__name__}: {e}); "
                      "install the `bench` extra")
    return f"sentence-transformers {_version('sentence-transformers')}, torch {_version('torch')}", None


# ---- MABWiser ----------------------------------------------------------------------------------

def mabwiser_linucb(x: np.ndarray, arm: np.ndarray, reward: np.ndarray, n_arms: int,
                    alpha: float, l2_lambda: float = 1.0):
    """A MABWiser LinUCB over arms 0..n_arms-1 fitted on (x [n, d], arm [n], reward [n]).

    Its per-arm A = l2_lambda I + X^T X and b = X^T y equal the engine's ridge (ridge = l2_lambda)
    on the quality target, so both make the same decisions under a pure LinUCB policy.
    """
    from mabwiser.mab import MAB, LearningPolicy

    mab = MAB(list(range(n_arms)), LearningPolicy.LinUCB(alpha=alpha, l2_lambda=l2_lambda), seed=0)
    mab.fit(np.asarray(arm).tolist(), np.asarray(reward, np.float64), np.asarray(x, np.float64))
    return mab


def mabwiser_predict(mab, x: np.ndarray) -> np.ndarray:
    """Chosen arm per row of x [B, d] (MABWiser returns a bare arm for a single context)."""
    out = mab.predict(x)
    return np.atleast_1d(np.asarray(out))


def mabwiser_partial_fit_each(mab, x: np.ndarray, arm: np.ndarray, reward: np.ndarray) -> None:
    """One `partial_fit` call per observation: how an online loop feeds MABWiser."""
    for i in range(len(x)):
        mab.partial_fit([int(arm[i])], [float(reward[i])], x[i:i + 1])


# ---- sentence-transformers ---------------------------------------------------------------------

def sentence_transformer(folder: str):
    """sentence-transformers' model on torch CPU from a local MiniLM folder (offline)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def st_encode(model, texts, max_length: int, batch_size: int) -> np.ndarray:
    """texts -> embeddings [N, H] float32, truncated to max_length tokens (right side)."""
    model.max_seq_length = max_length
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                        show_progress_bar=False)


def torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from mixllm_jax import state as S

# Compiled XLA programs persist across test runs (the fast tier is mostly compile time).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MIXLLM_TEST_JAX_CACHE", str(Path.home() / ".cache" / "mixllm-jax" / "jax-tests")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def make_state(capacity=4, dim=6, n_active=3, seed=0, **kw):
    """A state with `n_active` arms of increasing price."""
    st = S.init_state(capacity, dim, **kw)
    for k in range(n_active):
        st = S.add_arm(st, k, price_in=1e-6 * (k + 1), price_out=2e-6 * (k + 1),
                       ttft=0.5, tokens_per_s=50.0, max_concurrency=4)
    return st


def random_obs(rng, n, dim, n_arms):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, -1] = 1.0
    arm = rng.integers(0, n_arms, n).astype(np.int32)
    y = np.stack([rng.normal(size=n), rng.normal(size=n) + 4.0], 1).astype(np.float32)
    return x, arm, y


def numpy_ridge(x, arm, y, k, dim, ridge=1.0, w=None):
    """Closed-form ridge of arm k in float64: (theta [d, T], A_inv [d, d])."""
    m = arm == k
    w = np.ones(len(x)) if w is None else w
    xs, ys, ws = x[m].astype(np.float64), y[m].astype(np.float64), w[m]
    A = ridge * np.eye(dim) + (xs * ws[:, None]).T @ xs
    A_inv = np.linalg.inv(A)
    return A_inv @ ((xs * ws[:, None]).T @ ys), A_inv


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The fast tier (`make test-fast`): every module's pure logic on tiny shapes, under a minute on 2
# cores with a warm compilation cache. End-to-end modules (encoder weights, HTTP servers, training
# on the shared data, subprocesses) run in `make test` only.
FAST_MODULES = {"test_state", "test_bandit", "test_policy", "test_engine", "test_fit", "test_budget",
                "test_evaluate", "test_metrics", "test_tags", "test_baselines", "test_data", "test_feedback",
                "test_serve_config", "test_cache"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)

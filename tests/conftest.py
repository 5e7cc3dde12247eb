import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from mixllm_jax.core import state as S

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
                "test_serve_config", "test_cache", "test_serve_units", "test_gateway_units", "test_tokens",
                "test_cli_options"}


# The longest modules first (each runs whole on one xdist worker, --dist loadfile): the other worker
# takes the many short ones meanwhile instead of idling at the end while one long module finishes.
LONGEST_FIRST = ("test_mesh", "test_examples", "test_serve_explore", "test_cluster", "test_spend_provenance",
                 "test_gateway", "test_security", "test_server")


def pytest_configure(config):
    """The pytest process compiles with LLVM's cheap passes: its tests are mostly compiling tiny
    shapes (the fast tier: a third less CPU on a cold cache; the in-process experiments, encoder and
    simulator tests take as long either way). XLA reads XLA_FLAGS when jax starts its backend, here;
    the flags are then taken back, so the console scripts, servers and children the tests start run
    as users run them. (Not at import: tests/mesh_child.py imports this module before
    jax.distributed.initialize, which must come before the backend starts.)"""
    flags = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{flags or ''} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    jax.devices()
    if flags is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = flags


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable: order within a module kept


# ---- the HTTP service (test_server.py, test_security.py, test_fuzz.py): see serve_helpers.py

TEST_KEYS = {  # plaintext API keys of the secured test server (only their SHA-256 is in its keys file)
    "admin": "mxk_test-admin-key", "route": "mxk_test-route-key", "feedback": "mxk_test-feedback-key",
    "client": "mxk_test-client-key"}
BACKEND_KEY_ENV, BACKEND_KEY = "MIXLLM_TEST_BACKEND_KEY", "sk-test-backend-key"  # the allow-list's key for the stub
SERVER_SECRET = "sk-server-secret-never-sent"  # in the server's environment; no request may send it anywhere
TEST_ROLES = {"admin": ["admin"], "route": ["route"], "feedback": ["feedback"], "client": ["route", "feedback"]}


@pytest.fixture(scope="session")
def served_router(tmp_path_factory, worker_id):
    """(checkpoint dir, model names) of one small router, trained once per run: under pytest-xdist
    the first worker that needs it trains it into the run's shared temporary folder, the others
    wait for it (a file lock) and read it. MIXLLM_TEST_ROUTER=DIR: a checkpoint saved by
    serve_helpers.train_small_router instead (saves minutes when iterating on the service tests)."""
    pytest.importorskip("httpx")
    from filelock import FileLock

    from mixllm_jax.store.checkpoint import read_metadata
    from serve_helpers import train_small_router

    def saved(ck):
        slots = read_metadata(ck)["registry"]["slots"]
        return Path(ck), sorted(slots, key=slots.get)

    given = os.environ.get("MIXLLM_TEST_ROUTER")
    if given:
        return saved(given)
    if worker_id == "master":  # not under xdist
        return train_small_router(tmp_path_factory.mktemp("router"))
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    with FileLock(str(shared / "served-router.lock")):
        folder = shared / "served-router"
        if not (folder / "done").exists():  # (a worker that failed half-way left no "done")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            train_small_router(folder)
            (folder / "done").touch()
        return saved(folder / "ck")


@pytest.fixture(scope="session")
def stub_backend(tmp_path_factory):
    """The URL of one stub OpenAI-compatible backend process (tests/stub_backend.py)."""
    pytest.importorskip("httpx")
    from serve_helpers import start_stub

    proc, url = start_stub(tmp_path_factory.mktemp("stub"))
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def secure_env(tmp_path_factory, served_router, stub_backend):
    """One server with API keys (TEST_KEYS), the stub on its allow-list, --max-llms 14, 2 s
    header/body timeouts, route bookings of 2 s (12 per key), shared by test_fuzz.py and test_security.py (requests default to the
    admin key)."""
    import json

    from mixllm_jax.serve.auth import hash_key
    from serve_helpers import ServerProc, write_backends

    ck, models = served_router
    tmp = tmp_path_factory.mktemp("secure")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": n, "sha256": hash_key(k), "roles": TEST_ROLES[n]}
                                         for n, k in TEST_KEYS.items()]}))
    from serve_helpers import free_port

    closed = f"127.0.0.1:{free_port()}"  # on the allow-list, nothing listening: a backend that cannot be reached
    backends = write_backends(tmp / "backends.yaml", stub_backend, models, key_env=BACKEND_KEY_ENV,
                              more_allowed=[closed])
    server = ServerProc.from_router(tmp, ck, backends, key=TEST_KEYS["admin"], env={
        BACKEND_KEY_ENV: BACKEND_KEY, "MIXLLM_TEST_SERVER_SECRET": SERVER_SECRET}, extra_args=[
        "--api-keys", str(keys), "--max-llms", "14", "--body-timeout-s", "2", "--header-timeout-s", "2",
        "--booking-ttl-s", "2", "--max-booked-per-key", "12"])
    try:
        server.start()
        yield {"server": server, "stub": stub_backend, "models": models, "keys": TEST_KEYS, "tmp": tmp,
               "closed": closed}
    finally:
        server.kill()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The fuzz suite's counts of generated cases by status code or outcome (test_fuzz.py)."""
    counts = getattr(config, "_mixllm_fuzz_counts", None)
    if not counts and hasattr(config, "_tmp_path_factory"):  # under xdist: the worker's file
        counts = {}
        for f in config._tmp_path_factory.getbasetemp().glob("*/fuzz-counts.json"):
            for suite, c in json.loads(f.read_text()).items():
                counts.setdefault(suite, {}).update(c)
    if counts:
        terminalreporter.section("fuzz cases by status code / outcome")
        total = 0
        for suite in sorted(counts):
            c = counts[suite]
            total += sum(c.values())
            terminalreporter.write_line(f"{suite}: {sum(c.values())} cases: "
                                        + ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=str)))
        terminalreporter.write_line(f"total: {total} generated cases")

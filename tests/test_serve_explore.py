"""The served decision is the library's: one text -> decision function (router.route_text_batch).

A checkpoint whose policy explores (Thompson sampling, epsilon-mixing, a softmax temperature) is
served with its exploration: the server started with --seed S routes one prompt repeatedly, and
the library, on the same restored state with the same key sequence (the k-th stochastic batch uses
the k-th split of PRNGKey(S)), makes the same decisions, draw for draw. PUT /v1/policy switches
modes; GET /v1/policy reports exactly what is served; the switch is journaled and replayed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")

from serve_helpers import PROMPT, ServerProc, write_backends  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 7
ROUTES = 16  # routes per mode
MODES = [  # (PUT /v1/policy body, the library's policy fields)
    ({"explore": "thompson", "alpha": 30.0, "epsilon": 0.0, "temperature": 0.0},
     dict(explore="thompson", alpha=30.0, epsilon=0.0, temperature=0.0)),
    ({"explore": "ucb", "epsilon": 0.5}, dict(explore="ucb", epsilon=0.5)),
    ({"epsilon": 0.0, "temperature": 0.05}, dict(epsilon=0.0, temperature=0.05)),
    ({"explore": "greedy", "temperature": 0.0}, dict(explore="greedy", temperature=0.0)),
    ({"explore": "ucb", "alpha": 1.0}, dict(explore="ucb", alpha=1.0)),
]


class Library:
    """The library's decisions on the restored checkpoint, with the server's key sequence."""

    def __init__(self, ck):
        from mixllm_jax.store import checkpoint

        self.router, _ = checkpoint.restore_router(ck)
        self.key = jax.random.PRNGKey(SEED)
        self.names = {s: n for n, s in self.router.registry.slots.items()}

    def route(self, policy) -> str:
        key = None
        if policy.stochastic:
            self.key, key = jax.random.split(self.key)
        d, _, _ = self.router.decide([PROMPT], policy, key)
        return self.names[int(np.asarray(d.arm)[0])]


def _served(srv) -> list[str]:
    return [srv.route(PROMPT, book_load=False)["model"] for _ in range(ROUTES)]


@pytest.fixture(scope="module")
def explore_env(tmp_path_factory, served_router, stub_backend):
    """A copy of the small router saved with Thompson sampling and no latency penalty (beta 0: the
    load model plays no part), served with --seed."""
    from mixllm_jax.store import checkpoint

    ck, models = served_router
    tmp = tmp_path_factory.mktemp("explore")
    router, _ = checkpoint.restore_router(ck)
    router.policy = router.policy.replace(explore="thompson", alpha=30.0, beta=0.0)
    checkpoint.save_router(router, tmp / "ck")
    server = ServerProc(tmp, tmp / "ck", write_backends(tmp / "backends.yaml", stub_backend, models),
                        extra_args=["--seed", str(SEED)])
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_route_command_explores_with_its_seed(explore_env):
    """`mixllm-jax route` on the Thompson checkpoint: the draws come from --seed (exit status 0)."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "mixllm-jax"
    ck = explore_env.tmp / "ck-route"
    import shutil

    shutil.copytree(explore_env.checkpoint, ck)
    lib = Library(ck)
    chosen = {}
    for seed in range(2):
        r = subprocess.run([str(exe), "route", "--router", str(ck), "--seed", str(seed), PROMPT],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "explore thompson" in r.stdout and f"(seed {seed})" in r.stdout
        chosen[seed] = r.stdout.split("chosen: ")[1].split()[0]
        d, _, _ = lib.router.decide([PROMPT], key=jax.random.PRNGKey(seed))
        assert chosen[seed] == lib.names[int(np.asarray(d.arm)[0])]


def test_served_exploration_is_the_librarys_draw_for_draw(explore_env):
    srv = explore_env
    lib = Library(srv.checkpoint)
    view = srv.get("/v1/policy").json()
    assert view["explore"] == "thompson" and view["alpha"] == 30.0 and view["beta"] == 0.0
    policy = lib.router.policy
    distinct = {}
    for body, fields in [(None, {})] + MODES:
        if body is not None:
            r = srv.put("/v1/policy", body)
            assert r.status_code == 200, r.text
            policy = policy.replace(**fields)
            got = r.json()
            assert got == srv.get("/v1/policy").json()
            assert got["explore"] == policy.explore and got["epsilon"] == pytest.approx(float(policy.epsilon))
            assert got["temperature"] == pytest.approx(float(policy.temperature))
        served = _served(srv)
        want = [lib.route(policy) for _ in range(ROUTES)]
        assert served == want, (policy, served, want)
        distinct[(policy.explore, float(policy.epsilon), float(policy.temperature))] = len(set(served))
    # the stochastic modes explore; greedy and UCB decide one LLM for one prompt
    assert distinct[("thompson", 0.0, 0.0)] > 1 and distinct[("ucb", 0.5, 0.0)] > 1
    assert distinct[("greedy", 0.0, 0.0)] == 1 and distinct[("ucb", 0.0, 0.0)] == 1


def test_policy_changes_are_validated_journaled_and_replayed(explore_env):
    srv = explore_env
    before = srv.get("/v1/policy").json()
    for bad in ({"explore": "random"}, {"epsilon": 1.5}, {"temperature": -1}, {"alpha": "x"},
                {"in_batch_load": 1}, {"nonsense": 1}, {}):
        r = srv.put("/v1/policy", bad)
        assert r.status_code == 422, (bad, r.text)
    assert srv.get("/v1/policy").json() == before  # nothing half-applied
    set_ = srv.put("/v1/policy", {"explore": "thompson", "alpha": 2.0, "epsilon": 0.1, "cost_weight": 5.0}).json()
    assert (set_["explore"], set_["alpha"], set_["epsilon"], set_["cost_weight"]) == ("thompson", 2.0,
                                                                                       pytest.approx(0.1), 5.0)
    srv.kill()  # no checkpoint at exit: the policy comes back from the journal
    srv.start()
    assert srv.get("/v1/policy").json() == set_

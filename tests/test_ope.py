"""Off-policy evaluation: IPS / SNIPS / DR unbiased with honest intervals on a synthetic bandit of
known value; target-policy probabilities from a router; logs written, read and replayed."""

import json

import numpy as np
import pytest

from mixllm_jax.core import engine
from mixllm_jax.store import journal
from mixllm_jax.offline import ope
from mixllm_jax.core.policy import Policy, choice_probs
from conftest import make_state, random_obs


def _softmax(s, T):
    e = np.exp((s - s.max(1, keepdims=True)) / T)
    return e / e.sum(1, keepdims=True)


def _bandit(rng, n):
    """Contexts with K = 3 actions whose reward is Bernoulli(mu(x)): (mu [n, 3], logging probs [n, 3])."""
    z = rng.normal(size=(n, 2))
    mu = 1 / (1 + np.exp(-np.stack([z[:, 0], z[:, 1], 0.5 * (z[:, 0] - z[:, 1]) + 0.3], 1)))
    logging = 0.8 * _softmax(np.stack([z[:, 1], z[:, 0], 0 * z[:, 0]], 1), 1.0) + 0.2 / 3  # softmax + epsilon
    return z, mu, logging


def test_ips_snips_dr_are_unbiased_with_honest_intervals():
    rng = np.random.default_rng(0)
    reps, n = 300, 400
    targets = {"greedy": lambda z, mu: np.eye(3)[np.argmax(np.stack([z[:, 0], -z[:, 0], z[:, 1]], 1), 1)],
               "softmax": lambda z, mu: _softmax(np.stack([z[:, 0], z[:, 1], -z[:, 1]], 1), 0.5)}
    for name, target in targets.items():
        est = {k: [] for k in ("ips", "snips", "dr")}
        cover = {k: 0 for k in est}
        truths = []
        for _ in range(reps):
            z, mu, logging = _bandit(rng, n)
            a = np.array([rng.choice(3, p=p) for p in logging])
            r = (rng.random(n) < mu[np.arange(n), a]).astype(float)
            pi = target(z, mu)
            truth = float((pi * mu).sum(1).mean())  # the value on these contexts
            truths.append(truth)
            q_hat = mu + 0.1 * rng.normal(size=mu.shape)  # an imperfect reward model
            out = ope.evaluate(r, logging[np.arange(n), a], a, pi, q_hat)
            for k, e in out.items():
                est[k].append(e.value - truth)
                cover[k] += e.covers(truth)
        for k in est:
            bias = np.mean(est[k])
            assert abs(bias) < 4 * np.std(est[k]) / np.sqrt(reps) + (0.01 if k == "snips" else 0), (name, k, bias)
            assert 0.88 <= cover[k] / reps <= 0.99, (name, k, cover[k] / reps)
        assert np.std(est["dr"]) < np.std(est["ips"])  # a good reward model lowers the variance


def test_estimators_reject_bad_inputs():
    with pytest.raises(ValueError, match="propensities"):
        ope.ips(np.ones(3), np.array([0.5, 0.0, 0.2]), np.ones(3))
    with pytest.raises(ValueError, match="vectors"):
        ope.ips(np.ones(3), np.ones(2), np.ones(3))


def test_policy_probs_of_a_router(rng):
    st = make_state(4, 6, 3)
    x, a, y = random_obs(rng, 300, 6, 3)
    st = engine.update(st, x, a, y)
    from mixllm_jax.core.state import ArmRegistry

    reg = ArmRegistry(4)
    reg.slots = {"a": 0, "b": 1, "c": 2}
    q = x[:50]
    pt = np.full(50, 100.0, np.float32)
    models = ["c", "a", "b", "unknown"]
    pol = Policy(cost_weight=10.0, alpha=0.0, beta=0.0)
    pi, qh = ope.policy_probs(st, reg, q, pt, pol, models)
    d = engine.route(st, q, pt, pol.replace(in_batch_load=False))
    cols = {0: 1, 1: 2, 2: 0}
    np.testing.assert_array_equal(pi.argmax(1), [cols[int(k)] for k in np.asarray(d.arm)])
    assert set(np.unique(pi)) <= {0.0, 1.0} and (pi[:, 3] == 0).all()
    np.testing.assert_allclose(qh[:, 1], np.asarray(d.quality)[:, 0], atol=1e-6)
    soft = pol.replace(temperature=0.2, epsilon=0.3)
    pi, _ = ope.policy_probs(st, reg, q, pt, soft, models)
    want = 0.7 * np.asarray(choice_probs(np.asarray(d.score), 0.2)) + 0.1 * np.isfinite(np.asarray(d.score))
    np.testing.assert_allclose(pi[:, :3], want[:, [2, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(pi.sum(1), 1.0, atol=1e-6)
    th, _ = ope.policy_probs(st, reg, q, pt, pol.replace(explore="thompson", alpha=30.0), models, samples=400)
    np.testing.assert_allclose(th.sum(1), 1.0, atol=1e-6)
    assert (th.max(1) < 1).any()  # a real distribution


def test_logs_round_trip_and_server_folder(tmp_path, rng):
    x = rng.normal(size=(4, 5)).astype(np.float32)
    path = ope.write_log(tmp_path / "log.jsonl", x, [10, 20, 30, 40], ["a", "b", "a", "c"], [1, 0, 0.5, 1],
                         [0.5, 0.25, 0.5, 1.0])
    log = ope.read_log(path)
    np.testing.assert_array_equal(log.x, x)
    assert log.model == ["a", "b", "a", "c"] and log.models == ["a", "b", "c"]
    np.testing.assert_allclose(log.propensity, [0.5, 0.25, 0.5, 1.0])
    np.testing.assert_array_equal(log.actions(["c", "a", "b"]), [1, 2, 1, 0])
    # a server log folder: decisions in requests/ (propensity "p"), rewards in the journal
    (tmp_path / "srv" / "requests").mkdir(parents=True)
    (tmp_path / "srv" / "journal").mkdir()
    with open(tmp_path / "srv" / "requests" / "requests-000000000.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"r{i}", "slot": i, "arm_id": 0, "model": "abc"[i], "pt": 5.0, "lt": 1.0,
                                "x": journal.encode_x(x[i]), "p": 0.2 * (i + 1)}) + "\n")
    with open(tmp_path / "srv" / "journal" / "journal-000000001.jsonl", "w") as f:
        f.write(json.dumps({"seq": 1, "type": "quality", "rid": "r2", "quality": 0.9, "source": "user"}) + "\n")
        f.write(json.dumps({"seq": 2, "type": "quality", "rid": "r0", "quality": 0.1, "source": "user"}) + "\n")
    log = ope.read_log(tmp_path / "srv")
    assert log.model == ["a", "c"]
    np.testing.assert_allclose(log.reward, [0.1, 0.9])
    np.testing.assert_allclose(log.propensity, [0.2, 0.6])
    with pytest.raises(ValueError, match="decision"):
        (tmp_path / "bad.jsonl").write_text('{"model": "a"}\n')
        ope.read_log(tmp_path / "bad.jsonl")

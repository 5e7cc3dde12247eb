"""Off-policy evaluation: the value of a new policy from logged decisions with propensities.

A log holds, per served decision i: the router features x_i, the action a_i (an LLM), the reward
r_i observed for it (e.g. quality), and the propensity p_i = P(a_i | x_i) under the policy that
served it (`policy.Decision.propensity`; the server journals it with every decision, the
simulator records it). For a target policy with action probabilities pi(k | x_i):

    IPS    v = mean_i  pi(a_i | x_i) / p_i * r_i                             (unbiased)
    SNIPS  v = sum_i w_i r_i / sum_i w_i,  w_i = pi(a_i | x_i) / p_i           (self-normalised)
    DR     v = mean_i [ sum_k pi(k | x_i) q(x_i, k) + w_i (r_i - q(x_i, a_i)) ]  (unbiased for any
           reward model q when the propensities are right; lower variance when q is good)

Each estimate comes with a standard error and a 95% normal interval (mean of per-decision terms;
the delta method for SNIPS) and the weights' effective sample size. Unbiasedness needs every
action the target may take to have p > 0 in the log: log with epsilon-mixing or a softmax.

`policy_probs` turns a router state and `policy.Policy` into pi(k | x) over the log's actions
(no load: the latency penalty is not part of the evaluated policy). `read_log` reads a decision
log (JSONL written by `write_log`) or a server log folder (decisions from `requests/`, rewards
from the journal's quality records). See docs/architecture.md, "Online learning".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mixllm_jax.core import engine
from mixllm_jax.store import journal
from mixllm_jax.core.policy import Policy, choice_probs
from mixllm_jax.core.state import ArmRegistry, RouterState

Z95 = 1.959964


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A policy value estimate: value, standard error, 95% interval, n, effective sample size."""

    value: float
    se: float
    low: float
    high: float
    n: int
    ess: float

    def covers(self, truth: float) -> bool:
        return bool(self.low <= truth <= self.high)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _estimate(terms: np.ndarray, w: np.ndarray) -> Estimate:
    n = len(terms)
    v = float(terms.mean())
    se = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return Estimate(v, se, v - Z95 * se, v + Z95 * se, n, _ess(w))


def _ess(w: np.ndarray) -> float:
    s2 = float((w ** 2).sum())
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


def _check(reward, logging_p, target_p):
    r, p, t = (np.asarray(a, np.float64) for a in (reward, logging_p, target_p))
    if not (r.shape == p.shape == t.shape and r.ndim == 1 and len(r)):
        raise ValueError(f"reward, propensity and target probability must be [N] vectors, got {r.shape}, "
                         f"{p.shape}, {t.shape}")
    if not (np.all(np.isfinite(r)) and np.all(p > 0) and np.all(p <= 1 + 1e-6) and np.all((t >= 0) & (t <= 1 + 1e-6))):
        raise ValueError("rewards must be finite, propensities in (0, 1] and target probabilities in [0, 1]")
    return r, p, t


def ips(reward, logging_p, target_p) -> Estimate:
    """Inverse propensity score estimate: reward, logging_p (propensity of the logged action),
    target_p (the target policy's probability of the logged action), all [N]."""
    r, p, t = _check(reward, logging_p, target_p)
    w = t / p
    return _estimate(w * r, w)


def snips(reward, logging_p, target_p) -> Estimate:
    """Self-normalised IPS (bias O(1/N), often much lower variance); delta-method interval."""
    r, p, t = _check(reward, logging_p, target_p)
    w = t / p
    if w.sum() <= 0:
        raise ValueError("the target policy gives probability 0 to every logged action: SNIPS is undefined")
    v = float((w * r).sum() / w.sum())
    n = len(r)
    infl = w * (r - v) / w.mean()  # influence terms of the ratio estimator
    se = float(infl.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return Estimate(v, se, v - Z95 * se, v + Z95 * se, n, _ess(w))


def doubly_robust(reward, logging_p, target_probs, actions, q_hat) -> Estimate:
    """Doubly robust estimate. target_probs [N, K] (the target policy over the K actions), actions
    [N] int (logged, in 0..K-1), q_hat [N, K] a reward model's predictions."""
    pi = np.asarray(target_probs, np.float64)
    q = np.asarray(q_hat, np.float64)
    a = np.asarray(actions)
    if pi.shape != q.shape or pi.ndim != 2 or a.shape != (pi.shape[0],):
        raise ValueError(f"target_probs and q_hat must be [N, K] and actions [N], got {pi.shape}, {q.shape}, {a.shape}")
    rows = np.arange(len(a))
    r, p, t = _check(reward, logging_p, pi[rows, a])
    w = t / p
    terms = (pi * q).sum(1) + w * (r - q[rows, a])
    return _estimate(terms, w)


def evaluate(reward, logging_p, actions, target_probs, q_hat=None) -> dict[str, Estimate]:
    """IPS, SNIPS and (with a reward model q_hat [N, K]) DR estimates of one target policy."""
    pi = np.asarray(target_probs, np.float64)
    a = np.asarray(actions)
    t = pi[np.arange(len(a)), a]
    out = {"ips": ips(reward, logging_p, t), "snips": snips(reward, logging_p, t)}
    if q_hat is not None:
        out["dr"] = doubly_robust(reward, logging_p, pi, a, q_hat)
    return out


def policy_probs(state: RouterState, registry: ArmRegistry, x, prompt_tokens, policy: Policy,
                 models: Sequence[str], samples: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The target policy's action probabilities over `models` for contexts x [N, d] with
    prompt_tokens [N], without load: (pi [N, M], predicted quality [N, M] for DR).

    Deterministic policies give one-hot rows; softmax and epsilon are exact; Thompson sampling is
    averaged over `samples` posterior draws. Models that are not registered or not active get 0.
    """
    greedy = policy.replace(explore="greedy", alpha=0.0, beta=0.0, temperature=0.0, epsilon=0.0, in_batch_load=False)
    d = engine.route(state, x, prompt_tokens, greedy)
    base, u, q = (np.asarray(getattr(d, k), np.float64) for k in ("score", "uncertainty", "quality"))
    T, eps, alpha = float(policy.temperature), float(policy.epsilon), float(policy.alpha)
    if policy.explore == "ucb":
        probs = np.asarray(choice_probs(base + alpha * u, T), np.float64)
    elif policy.explore == "thompson":
        rng = np.random.default_rng(seed)
        probs = np.zeros_like(base)
        for _ in range(samples):
            probs += np.asarray(choice_probs(base + alpha * u * rng.normal(size=base.shape), T), np.float64)
        probs /= samples
    else:
        probs = np.asarray(choice_probs(base, T), np.float64)
    eligible = np.isfinite(base)
    probs = (1 - eps) * probs + eps * eligible / eligible.sum(1, keepdims=True)
    active = np.asarray(state.active)
    pi, qm = np.zeros((len(probs), len(models))), np.zeros((len(probs), len(models)))
    for j, name in enumerate(models):
        s = registry.slots.get(name)
        if s is not None and active[s]:
            pi[:, j], qm[:, j] = probs[:, s], q[:, s]
    return pi, qm


# ----------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecisionLog:
    """Logged decisions: x [N, d], prompt_tokens [N], model (action) names [N], reward [N],
    propensity [N]; models: the distinct action names (column order of `actions`)."""

    x: np.ndarray
    prompt_tokens: np.ndarray
    model: list[str]
    reward: np.ndarray
    propensity: np.ndarray

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.model))

    def actions(self, models: Sequence[str]) -> np.ndarray:
        idx = {m: j for j, m in enumerate(models)}
        missing = sorted(set(self.model) - set(idx))
        if missing:
            raise ValueError(f"logged models {missing} are not among {list(models)}")
        return np.array([idx[m] for m in self.model], np.int64)

    def __len__(self) -> int:
        return len(self.model)


def write_log(path, x, prompt_tokens, model: Sequence[str], reward, propensity) -> Path:
    """Write a decision log: one JSON line per decision {"x" (base64 float32, as the server's
    request log), "prompt_tokens", "model", "reward", "propensity"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for xi, pt, m, r, p in zip(np.asarray(x, np.float32), prompt_tokens, model, reward, propensity):
            f.write(json.dumps({"x": journal.encode_x(xi), "prompt_tokens": float(pt), "model": str(m),
                                "reward": float(r), "propensity": float(p)}, separators=(",", ":")) + "\n")
    return path


def read_log(path) -> DecisionLog:
    """A decision log file (write_log), or a server log folder: the decisions of `requests/` that
    got a quality record in `journal/` (the reward; the last one when several), with the
    propensity journaled with each decision."""
    path = Path(path)
    if path.is_dir():
        return _read_server_log(path)
    xs, pts, models, rewards, props = [], [], [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                xs.append(journal.decode_x(rec["x"]))
                pts.append(float(rec.get("prompt_tokens", 0.0)))
                models.append(str(rec["model"]))
                rewards.append(float(rec["reward"]))
                props.append(float(rec["propensity"]))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a decision record ({e})") from None
    if not models:
        raise ValueError(f"{path} holds no decisions")
    return DecisionLog(np.stack(xs), np.asarray(pts, np.float32), models, np.asarray(rewards), np.asarray(props))


def _read_server_log(logdir: Path) -> DecisionLog:
    req_dir, jdir = logdir / "requests", logdir / "journal"
    if not req_dir.is_dir() or not jdir.is_dir():
        raise ValueError(f"{logdir} is neither a decision log file nor a server log folder (requests/, journal/)")
    quality = {}
    for seg in sorted(jdir.glob("journal-*.jsonl")):
        for line in open(seg):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("type") == "quality" and rec.get("source") != "backend_failure":
                quality[rec["rid"]] = float(rec["quality"])
    xs, pts, models, rewards, props = [], [], [], [], []
    for seg in sorted(req_dir.glob("requests-*.jsonl")):
        for line in open(seg):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("id") in quality:
                xs.append(journal.decode_x(rec["x"]))
                pts.append(float(rec.get("pt", 0.0)))
                models.append(str(rec["model"]))
                rewards.append(quality[rec["id"]])
                props.append(float(rec.get("p", 1.0)))
    if not models:
        raise ValueError(f"{logdir}: no routed request has a quality record")
    return DecisionLog(np.stack(xs), np.asarray(pts, np.float32), models, np.asarray(rewards), np.asarray(props))


def evaluate_router_on_log(log: DecisionLog, state: RouterState, registry: ArmRegistry, policy: Policy,
                           samples: int = 256) -> dict:
    """IPS / SNIPS / DR estimates (dicts) of a router policy's value on a log, with the share of
    logged decisions the target agrees with."""
    models = list(dict.fromkeys(list(registry.names) + log.models))
    pi, q = policy_probs(state, registry, log.x, log.prompt_tokens, policy, models, samples)
    a = log.actions(models)
    est = evaluate(log.reward, log.propensity, a, pi, q)
    return {"n": len(log), "target_prob_of_logged_mean": float(pi[np.arange(len(a)), a].mean()),
            **{k: v.to_dict() for k, v in est.items()}}


"""HTTP router service: micro-batched routing, an OpenAI-compatible proxy, live feedback and live LLMs.

    mixllm-jax serve --checkpoint checkpoints/router --backends backends.yaml [--port 8000]
    python -m mixllm_jax.server --checkpoint ... (the same)

Endpoints (JSON; errors are ``{"error": {"message", "type", "param"}}`` with a 4xx/5xx status):

  POST /v1/route             {"prompt": str | [str], "cost_weight"?: float >= 0, "budget"?: USD > 0,
                              "book_load"?: bool}
                             -> one route object, or {"routes": [route, ...]} for a list:
                             {"request_id", "model", "domain", "explanation": {llm: {"quality",
                              "tokens", "cost", "uncertainty", "wait", "penalty", "feedback",
                              "score", "eligible"}}}
  POST /v1/chat/completions  OpenAI body (+ optional "cost_weight", "budget"); routes the last user
                             message (or the conversation, see route_on), forwards to the chosen
                             LLM's backend, streaming (SSE) passed through. The answer carries headers
                             x-mixllm-request-id / x-mixllm-model (and a "mixllm" field when not
                             streaming). Usage and latency are recorded for that request.
  POST /v1/feedback          {"request_id", "quality"?: [0, 1], "thumbs"?: "up" | "down",
                              "completion_tokens"?: int} -> {"request_id", "model", "recorded": [...]}
  GET  /v1/models            {"object": "list", "data": [model, ...]}
  POST /v1/models            {"name", "price_in_per_mtok", "price_out_per_mtok", "ttft_s"?,
                              "tokens_per_s"?, "max_concurrency"?, "prior"?, "backend"?: {"base_url",
                              "model"?, "api_key_env"?, "timeout_s"?}} -> 201 model
  DELETE /v1/models/{name}   -> {"removed": name}
  GET  /metrics              Prometheus text format
  GET  /healthz              {"status": "ok", ...}

Design (see DESIGN.md for the math):
  * One worker thread owns every JAX computation and every state change, so routing calls never
    overlap and the state needs no lock. A micro-batcher (batcher.py) feeds it batches.
  * `_serve_route` is the fused, jitted text-to-decision computation of `router.route_text_batch`
    plus what serving needs: the binary-feedback network's score term, per-request cost weights,
    per-request budgets and eligibility (chat goes only to LLMs with a backend), and the features x
    it returns for later feedback.
  * Every state change is journaled and fsync'ed before it is acknowledged (feedback_log.Journal)
    and applied in journal order; the Orbax checkpoint records the last applied sequence number
    (extras["journal_seq"]) so a restart replays exactly the records after it.
  * The live load model runs on the wall clock: state.clock is seconds since the server started;
    each decision books its predicted service time (`book_load`). The load is reset on restart.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mixllm_jax.server")

MAX_NAME = 200
ROUTE_ON = ("last_user", "conversation")


# ---------------------------------------------------------------------------------------------
# Errors and request parsing


class ApiError(Exception):
    """An error answered to the client: HTTP status, message naming the problem, OpenAI-style type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def _reject_constant(c):
    raise ValueError(f"{c} is not allowed in JSON (numbers must be finite)")


def parse_json(body: bytes, limit: int) -> Any:
    if len(body) > limit:
        raise ApiError(413, f"request body of {len(body)} bytes exceeds the limit of {limit} bytes")
    if not body.strip():
        raise ApiError(400, "empty request body: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None


async def read_json_object(request, limit: int) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise ApiError(413, f"request body of {cl} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    obj = parse_json(b"".join(chunks), limit)
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _absent(obj: dict, key: str, default, name: str) -> bool:
    """True when the field is missing or null and has a default (``...`` = required: a 422)."""
    if key in obj and obj[key] is not None:
        return False
    if default is ...:
        raise ApiError(422, f"field {name!r} is required", param=name)
    return True


def get_number(obj: dict, key: str, *, default=None, lo=None, hi=None, lo_open=False,
               integer=False, where: str = "") -> Any:
    """A finite number field (or the default when absent/null), range-checked, or a 422 naming it."""
    name = where + key
    if _absent(obj, key, default, name):
        return default
    v = obj[key]
    if integer:
        if not (isinstance(v, int) and not isinstance(v, bool)):
            raise ApiError(422, f"field {name!r} must be an integer, got {json.dumps(v)[:60]}", param=name)
    elif not _is_num(v):
        raise ApiError(422, f"field {name!r} must be a number, got {json.dumps(v)[:60]}", param=name)
    if not math.isfinite(v):
        raise ApiError(422, f"field {name!r} must be finite, got {v}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(422, f"field {name!r} must be {'>' if lo_open else '>='} {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(422, f"field {name!r} must be <= {hi}, got {v}", param=name)
    return v


def get_string(obj: dict, key: str, *, default=None, max_len: int = MAX_NAME, where: str = "") -> Any:
    name = where + key
    if _absent(obj, key, default, name):
        return default
    v = obj[key]
    if not isinstance(v, str) or not v:
        raise ApiError(422, f"field {name!r} must be a non-empty string, got {json.dumps(v)[:60]}", param=name)
    if len(v) > max_len:
        raise ApiError(422, f"field {name!r} is {len(v)} characters long, more than {max_len}", param=name)
    return v


def _reject_unknown(obj: dict, known: set, where: str = "") -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ApiError(422, f"unknown field(s) {[where + k for k in unknown]} (known: {sorted(known)})",
                       param=where + unknown[0])


# ---------------------------------------------------------------------------------------------
# Backends


@dataclasses.dataclass(frozen=True)
class Backend:
    """An OpenAI-compatible endpoint serving one LLM."""

    base_url: str
    model: str | None = None  # the model name at the backend (default: the LLM's name)
    api_key_env: str | None = None  # environment variable holding the API key
    timeout_s: float = 60.0

    def public(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env,
                "timeout_s": self.timeout_s}


def parse_backend(obj: Any, where: str) -> Backend:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a mapping with base_url, got {obj!r:.80}")
    unknown = sorted(set(obj) - {"base_url", "model", "api_key_env", "timeout_s"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: base_url, model, api_key_env, timeout_s)")
    url = obj.get("base_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}.base_url must be an http(s) URL, got {url!r}")
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"{where}.model must be a non-empty string, got {model!r}")
    key_env = obj.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not key_env):
        raise ValueError(f"{where}.api_key_env must be an environment variable name, got {key_env!r}")
    timeout = obj.get("timeout_s", 60.0)
    if not _is_num(timeout) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{where}.timeout_s must be a positive number of seconds, got {timeout!r}")
    return Backend(url.rstrip("/"), model, key_env, float(timeout))


def load_backends(path: str | Path | None) -> dict[str, Backend]:
    """backends.yaml: ``{backends: {llm name: {base_url, model?, api_key_env?, timeout_s?}}}``
    (the top-level ``backends:`` key may be left out)."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"backends file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if doc is None:
        return {}
    if isinstance(doc, dict) and "backends" in doc:
        doc = doc["backends"]
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of LLM name -> backend, got {type(doc).__name__}")
    return {str(name): parse_backend(spec, f"{path}: backends[{name!r}]") for name, spec in doc.items()}


# ---------------------------------------------------------------------------------------------
# The fused serving computation


def _serve_route_impl(enc_params, head_params, centroids, fb_params, state, ids, mask, prompt_tokens,
                      book, cost_weight, budget, allowed, alpha, beta, tau, *, enc_config, head_shape,
                      mode, fb_hidden):
    """ids, mask [B, L] -> Decision (with the feedback term and budget/eligibility), domain, x, fb.

    prompt_tokens, cost_weight, budget [B] (budget +inf = none); book [B] bool: rows that book load
    (padding rows do not); allowed [B, K] bool. An arm is eligible when allowed, active and its
    predicted cost is within the budget -- or it is the cheapest allowed arm, so a too-small budget
    still gets the cheapest LLM.
    """
    import jax.numpy as jnp

    from mixllm_jax import bandit, encoder as enc_mod, feedback
    from mixllm_jax.policy import MAX_LOG_TOKENS, Policy, route_batch
    from mixllm_jax.router import featurize
    from mixllm_jax.state import LOG_TOKENS

    e = enc_mod.embed_ids(enc_params, enc_config, ids, mask)
    x, domain = featurize(e, head_params, centroids, head_shape=head_shape, mode=mode)
    fb = feedback.FeedbackNet(state.capacity, fb_hidden).apply({"params": fb_params}, x)
    y_hat, _ = bandit.predict(state, x)
    tokens = jnp.exp(jnp.clip(y_hat[..., LOG_TOKENS], 0.0, MAX_LOG_TOKENS))
    cost = prompt_tokens[:, None] * state.price_in + tokens * state.price_out
    ok = allowed & state.active
    cheapest = jnp.min(jnp.where(ok, cost, jnp.inf), axis=1, keepdims=True)
    eligible = ok & (cost <= jnp.maximum(budget[:, None], cheapest))
    bonus = jnp.where(eligible, fb, -jnp.inf)
    policy = Policy(cost_weight=cost_weight[:, None], alpha=alpha, beta=beta, tau=tau, in_batch_load=True)
    d = route_batch(state, x, prompt_tokens, policy, book, bonus)
    return d, domain, x, fb, eligible


@functools.lru_cache(maxsize=None)
def _serve_route():
    import jax

    return jax.jit(_serve_route_impl, static_argnames=("enc_config", "head_shape", "mode", "fb_hidden"))


def _pow2_bucket(n: int, top: int) -> int:
    return min(1 << max(0, (n - 1).bit_length()), max(top, n))


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # no *_created series beside every counter
        r = self.registry = CollectorRegistry()
        lat = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.http = Counter("mixllm_http_requests_total", "HTTP requests by endpoint and status",
                            ["endpoint", "status"], registry=r)
        self.http_s = Histogram("mixllm_http_request_seconds", "time to answer (first byte when streaming)",
                                ["endpoint"], buckets=lat, registry=r)
        self.batch = Histogram("mixllm_route_batch_size", "prompts per routing call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_s = Histogram("mixllm_route_batch_seconds", "seconds per routing call", buckets=lat, registry=r)
        self.decisions = Counter("mixllm_decisions_total", "routing decisions by chosen LLM", ["model"], registry=r)
        self.feedback = Counter("mixllm_feedback_total", "feedback records journaled, by kind", ["kind"], registry=r)
        self.dropped = Counter("mixllm_feedback_dropped_total",
                               "feedback not applied because its LLM was removed meanwhile", registry=r)
        self.backend_s = Histogram("mixllm_backend_seconds", "backend call latency by LLM", ["model"],
                                   buckets=lat, registry=r)
        self.backend_fail = Counter("mixllm_backend_failures_total", "failed backend calls", ["model", "reason"],
                                    registry=r)
        self.rejected = Counter("mixllm_rejected_total", "requests refused for overload", ["reason"], registry=r)
        self.queue = Gauge("mixllm_queue_prompts", "prompts accepted and not yet routed", registry=r)
        self.models = Gauge("mixllm_models", "live LLMs", registry=r)
        self.journal_seq = Gauge("mixllm_journal_seq", "last journaled sequence number", registry=r)
        self.applied_seq = Gauge("mixllm_applied_seq", "last applied sequence number", registry=r)
        self.ckpt_step = Gauge("mixllm_checkpoint_step", "last checkpoint step saved or restored", registry=r)
        self.ckpts = Counter("mixllm_checkpoints_total", "checkpoints saved", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# The service


@dataclasses.dataclass
class ServeConfig:
    checkpoint: str | Path
    backends: str | Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    window_ms: float = 3.0
    max_batch: int = 64
    queue_limit: int = 1024
    log_dir: str | Path | None = None  # default: <checkpoint>.serve beside the checkpoint folder
    checkpoint_every_s: float = 60.0
    keep_checkpoints: int = 3
    max_prompt_chars: int = 100_000
    max_prompts: int = 256
    max_body_bytes: int = 4 << 20
    feature_cache: int = 20000
    max_inflight_proxy: int = 256
    route_on: str = "last_user"
    book_load: bool = True
    warmup: bool = False
    compilation_cache: str | Path | None = "auto"  # "auto": <log_dir>/jax-cache; None: off

    def check(self) -> None:
        if not self.window_ms >= 0:
            raise ValueError(f"window_ms must be >= 0, got {self.window_ms}")
        for k in ("max_batch", "queue_limit", "max_prompt_chars", "max_prompts", "max_body_bytes",
                  "feature_cache", "max_inflight_proxy", "keep_checkpoints"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.queue_limit < self.max_batch:
            raise ValueError(f"queue_limit ({self.queue_limit}) must be >= max_batch ({self.max_batch})")
        if self.route_on not in ROUTE_ON:
            raise ValueError(f"route_on must be one of {ROUTE_ON}, got {self.route_on!r}")
        if not self.checkpoint_every_s > 0:
            raise ValueError(f"checkpoint_every_s must be > 0, got {self.checkpoint_every_s}")

    @property
    def log_path(self) -> Path:
        if self.log_dir is not None:
            return Path(self.log_dir)
        ck = Path(self.checkpoint).absolute()
        return ck.with_name(ck.name + ".serve")


@dataclasses.dataclass
class RouteReq:
    """One prompt waiting to be routed (built on the event loop, consumed by the worker)."""

    ids: list
    prompt_tokens: int
    cost_weight: float | None
    budget: float | None
    allowed: np.ndarray | None  # [K] bool, or None for every active arm
    book: bool
    kind: str  # "route" or "chat"


class RouterService:
    """Owns the router, its live state, the logs, and the worker thread. See the module docstring."""

    def __init__(self, config: ServeConfig):
        config.check()
        self.cfg = config
        self.metrics = Metrics()
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mixllm-worker")
        self.aux = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mixllm-aux")  # tokenize, save
        self.router = None
        self.state = None
        self.registry = None
        self.fs = None
        self.arm_id = None  # [K] int64: identity of the model in each slot (0 = from the first checkpoint)
        self.applied_seq = 0
        self.ckpt_seq = 0
        self.prev_ckpt_seq = 0
        self.ckpt_step = None
        self.backends: dict[str, Backend] = {}
        self.file_backends: dict[str, Backend] = {}
        self.live_backends: dict[str, Backend] = {}
        self._pending: "collections.deque[dict]" = None
        self.journal = None
        self.features = None
        self.batcher = None
        self.http = None
        self.t0 = time.monotonic()
        self.proxy_inflight = 0
        self.started = self.ever_started = False
        self.replayed = 0
        self._ckpt_lock = None
        self._periodic = None
        self._tokenizer = None

    # ---- start / stop ---------------------------------------------------------------------

    async def start(self) -> None:
        import collections

        from mixllm_jax import batcher, feedback_log

        loop = asyncio.get_running_loop()
        self._pending = collections.deque()
        self._ckpt_lock = asyncio.Lock()
        logdir = self.cfg.log_path
        logdir.mkdir(parents=True, exist_ok=True)
        self.journal = feedback_log.Journal(logdir / "journal", on_durable=self._on_durable)
        self.features = feedback_log.FeatureStore(logdir / "requests", self.cfg.feature_cache)
        self.file_backends = load_backends(self.cfg.backends)
        await loop.run_in_executor(self.worker, self._load)
        self.journal.start(min_seq=self.applied_seq)
        self.metrics.journal_seq.set(self.journal.seq)
        self.batcher = batcher.MicroBatcher(self._route_batch, self.worker, self.cfg.window_ms / 1000.0,
                                            self.cfg.max_batch, self.cfg.queue_limit, on_batch=self._on_batch)
        self.batcher.start()
        import httpx

        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=self.cfg.max_inflight_proxy,
                                                          max_keepalive_connections=64),
                                      timeout=60.0, trust_env=False)
        self._periodic = loop.create_task(self._checkpoint_loop(), name="checkpointer")
        self.started = self.ever_started = True
        log.info("ready: %d LLMs, checkpoint step %s, replayed %d journal records, %d request features",
                 len(self.registry.slots), self.ckpt_step, self.replayed, len(self.features))

    async def stop(self) -> None:
        """Graceful stop (SIGTERM): finish queued routing, checkpoint, close the logs."""
        if not self.started:
            return
        self.started = False
        if self._periodic is not None:
            self._periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic
        await self.batcher.stop()
        try:
            await self.checkpoint(force=False)
        except Exception:
            log.exception("final checkpoint failed; the journal still holds every acknowledged record")
        self.journal.close()
        await asyncio.get_running_loop().run_in_executor(self.worker, self._drain)
        self.features.flush(sync=True)
        self.features.close()
        await self.http.aclose()
        self.worker.shutdown(wait=True)
        self.aux.shutdown(wait=True)
        log.info("stopped at journal seq %d (checkpoint step %s)", self.journal.seq, self.ckpt_step)

    # ---- loading and replay (worker thread) ---------------------------------------------------

    def _load(self) -> None:
        import jax

        from mixllm_jax import checkpoint, feedback

        if self.cfg.compilation_cache is not None:
            cache = (self.cfg.log_path / "jax-cache") if self.cfg.compilation_cache == "auto" \
                else Path(self.cfg.compilation_cache)
            with contextlib.suppress(Exception):
                jax.config.update("jax_compilation_cache_dir", str(cache))
                jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        ck = Path(self.cfg.checkpoint)
        meta = checkpoint.read_metadata(ck)
        like, extras_kind = self._extras_like(meta)
        router, extras = checkpoint.restore_router(ck, step=meta["step"], extras_like=like)
        if router.encoder is None:
            raise ValueError(f"checkpoint {ck} has no encoder: the server routes text and needs one")
        self.router = router
        self.ckpt_step = meta["step"]
        self.metrics.ckpt_step.set(self.ckpt_step)
        K, d = router.state.capacity, router.state.dim
        fs = arm_id = None
        seq = 0
        if extras is not None and extras_kind == "server":
            fs, seq, arm_id = extras["feedback"], int(extras["journal_seq"]), np.asarray(extras["arm_id"], np.int64)
        elif extras is not None and extras_kind == "feedback":
            fs = extras["feedback"]
        if fs is None:
            fs = feedback.init_feedback(d, K)
        if arm_id is None:
            arm_id = np.zeros(K, np.int64)
        self.fs = _fit_feedback(fs, K)
        self.arm_id = _fit_arm_id(arm_id, K)
        self.applied_seq = self.ckpt_seq = self.prev_ckpt_seq = seq
        self.state = _reset_load(router.state, 0.0)
        self.registry = router.registry
        self.live_backends = _read_live_backends(self.cfg.log_path / "live_models.json")
        self._refresh_backends()

        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(router.encoder.tokenizer.backend_tokenizer.to_str())
        tok.no_truncation()
        tok.no_padding()
        self._tokenizer = tok

        n_feat = self.features.load()
        records = self.journal.read()
        older = [r for r in records if r["seq"] <= seq]
        newer = [r for r in records if r["seq"] > seq]
        if records and records[0]["seq"] > seq + 1:
            raise RuntimeError(f"journal starts at seq {records[0]['seq']} but checkpoint step {self.ckpt_step} "
                               f"holds records up to seq {seq}: records {seq + 1}..{records[0]['seq'] - 1} "
                               f"are missing from {self.journal.dir}")
        self._apply(older, replay_flags_only=True)
        self._apply(newer)
        self.replayed = len(newer)
        log.info("restored step %s (journal seq %d), %d request features, replayed %d records",
                 self.ckpt_step, seq, n_feat, len(newer))
        if self.cfg.warmup:
            self._warmup()
        self._update_gauges()

    def _extras_like(self, meta: dict):
        """A template for the checkpoint's extras: ours (feedback, journal_seq, arm_id), the feedback
        network alone, or None (not ours: ignored)."""
        from mixllm_jax import feedback

        man = meta["arrays"].get("extras")
        if not man:
            return None, None
        tops = {k.split("/")[0] for k in man}
        if not tops <= {"feedback", "journal_seq", "arm_id"} or "feedback" not in tops:
            log.warning("checkpoint extras %s are not the server's; starting a fresh feedback network", sorted(tops))
            return None, None
        k0, k2 = man.get("feedback/params/Dense_0/kernel"), man.get("feedback/params/Dense_2/kernel")
        if k0 is None or k2 is None:
            return None, None
        fs = feedback.init_feedback(k0["shape"][0], k2["shape"][1], hidden=k0["shape"][1])
        like = {"feedback": fs}
        if tops == {"feedback", "journal_seq", "arm_id"}:
            like["journal_seq"] = np.zeros((), np.int64)
            like["arm_id"] = np.zeros(man["arm_id"]["shape"], np.int64)
            return like, "server"
        return (like, "feedback") if tops == {"feedback"} else (None, None)

    def _refresh_backends(self) -> None:
        b = dict(self.file_backends)
        b.update(self.live_backends)
        self.backends = b
        K = self.state.capacity
        mask = np.zeros(K, bool)
        for name, slot in self.registry.slots.items():
            mask[slot] = name in b
        self._backend_mask = mask

    def _warmup(self) -> None:
        from mixllm_jax import encoder as enc_mod

        t = time.perf_counter()
        sizes = sorted({_pow2_bucket(n, self.cfg.max_batch) for n in range(1, self.cfg.max_batch + 1)})
        lengths = [L for L in enc_mod.LENGTH_BUCKETS if L < self.router.max_length] + [self.router.max_length]
        for B in sizes:
            for L in lengths:
                self._decide(np.zeros((B, L), np.int32), np.ones((B, L), np.int32), [], commit=False)
        log.info("warm-up: compiled %d shapes in %.1f s", len(sizes) * len(lengths), time.perf_counter() - t)

    # ---- journal application (worker thread) ------------------------------------------------

    def _on_durable(self, records: list[dict]) -> None:
        """Journal writer thread: records are on disk; queue them, in order, for the worker."""
        self._pending.extend(records)
        self.metrics.journal_seq.set(records[-1]["seq"])
        with contextlib.suppress(RuntimeError):  # shutting down
            self.worker.submit(self._drain)

    def _drain(self) -> None:
        recs = []
        while True:
            try:
                recs.append(self._pending.popleft())
            except IndexError:
                break
        if recs:
            self._apply(recs)

    def _live(self, slot: int, arm_id: int) -> bool:
        return 0 <= slot < self.state.capacity and bool(self._active[slot]) and int(self.arm_id[slot]) == arm_id

    def _apply(self, records: list[dict], replay_flags_only: bool = False) -> None:
        """Apply journal records in seq order (live and on replay alike)."""
        from mixllm_jax import feedback_log

        self._active = np.asarray(self.state.active)
        i = 0
        while i < len(records):
            rec = records[i]
            typ = rec.get("type")
            if typ in ("quality", "thumbs"):
                j = i
                while j < len(records) and records[j].get("type") == typ:
                    j += 1
                group = records[i:j]
                for r in group:
                    e = self.features.get(r["rid"]) if self.features is not None else None
                    if e is not None:
                        if typ == "quality":
                            e.has_quality = True
                        else:
                            e.has_thumbs = True
                if not replay_flags_only:
                    live = [r for r in group if self._live(int(r["slot"]), int(r["arm_id"]))]
                    if len(live) < len(group):
                        self.metrics.dropped.inc(len(group) - len(live))
                    if live:
                        x = np.stack([feedback_log.decode_x(r["x"]) for r in live])
                        slots = np.array([int(r["slot"]) for r in live], np.int32)
                        if typ == "quality":
                            self._update_bandit(x, slots, live)
                        else:
                            self._update_feedback(x, slots, np.array([float(r["reward"]) for r in live], np.float32))
                self.applied_seq = max(self.applied_seq, group[-1]["seq"])
                i = j
                continue
            if typ == "usage":
                e = self.features.get(rec["rid"]) if self.features is not None else None
                if e is not None and rec.get("completion_tokens") is not None:
                    e.observed_tokens = float(rec["completion_tokens"])
            elif typ == "add_model" and not replay_flags_only:
                self._apply_add(rec)
            elif typ == "remove_model" and not replay_flags_only:
                self._apply_remove(rec)
            elif typ not in ("usage", "add_model", "remove_model"):
                log.warning("journal seq %s: unknown record type %r ignored", rec.get("seq"), typ)
            self.applied_seq = max(self.applied_seq, rec["seq"])
            i += 1
        self.metrics.applied_seq.set(self.applied_seq)

    def _update_bandit(self, x, slots, recs) -> None:
        from mixllm_jax import engine

        targets = np.array([[float(r["quality"]), float(r["log_tokens"])] for r in recs], np.float32)
        if self.state.n_targets > 2:
            targets = np.pad(targets, ((0, 0), (0, self.state.n_targets - 2)))
        weight = np.array([float(r.get("weight", 1.0)) for r in recs], np.float32)
        self.state = engine.update(self.state, x, slots, targets, weight)

    def _update_feedback(self, x, slots, reward) -> None:
        import jax.numpy as jnp

        from mixllm_jax import feedback

        n = len(slots)
        B = _pow2_bucket(n, max(n, 1))
        pad = B - n
        valid = np.arange(B) < n
        self.fs = feedback.update(self.fs, jnp.asarray(np.pad(x, ((0, pad), (0, 0)))),
                                  jnp.asarray(np.pad(slots, (0, pad))), jnp.asarray(np.pad(reward, (0, pad))),
                                  self.state.active, jnp.asarray(valid))

    def _apply_add(self, rec: dict) -> None:
        from mixllm_jax.state import add_llm

        name = rec["name"]
        if name in self.registry.slots:
            log.warning("journal seq %d: model %r already registered; add skipped", rec["seq"], name)
            return
        prior = rec["prior"]
        state, reg = add_llm(self.state, self.registry, name, price_in=rec["price_in"], price_out=rec["price_out"],
                             ttft=rec["ttft_s"], tokens_per_s=rec["tokens_per_s"],
                             max_concurrency=rec["max_concurrency"], prior=prior)
        slot = reg.slots[name]
        if state.capacity != self.state.capacity:
            log.info("capacity grew from %d to %d arms (one recompile)", self.state.capacity, state.capacity)
        self.fs = _reset_feedback_slot(_fit_feedback(self.fs, state.capacity), slot)
        arm_id = _fit_arm_id(self.arm_id, state.capacity).copy()
        arm_id[slot] = rec["seq"]
        self.state, self.registry, self.arm_id = state, reg, arm_id
        self._active = np.asarray(state.active)
        if rec.get("backend"):
            self.live_backends[name] = parse_backend(rec["backend"], f"model {name!r} backend")
        else:
            self.live_backends.pop(name, None)
        self._refresh_backends()
        self._update_gauges()

    def _apply_remove(self, rec: dict) -> None:
        from mixllm_jax.state import remove_llm

        name = rec["name"]
        if name not in self.registry.slots:
            log.warning("journal seq %d: model %r not registered; remove skipped", rec["seq"], name)
            return
        slot = self.registry.slots[name]
        self.state, self.registry = remove_llm(self.state, self.registry, name)
        arm_id = self.arm_id.copy()
        arm_id[slot] = -1
        self.arm_id = arm_id
        self._active = np.asarray(self.state.active)
        self.live_backends.pop(name, None)
        self._refresh_backends()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.models.set(len(self.registry.slots))

    # ---- routing (worker thread) -----------------------------------------------------------

    def _decide(self, ids, mask, reqs: list[RouteReq], commit: bool = True):
        """Run the fused computation on a padded batch; returns host arrays."""
        import jax

        from mixllm_jax import encoder as enc_mod  # noqa: F401

        B = ids.shape[0]
        K = self.state.capacity
        n = len(reqs)
        pol = self.router.policy
        pt = np.zeros(B, np.float32)
        cw = np.full(B, float(pol.cost_weight), np.float32)
        budget = np.full(B, np.inf, np.float32)
        allowed = np.ones((B, K), bool)
        book = np.zeros(B, bool)
        for i, r in enumerate(reqs):
            pt[i] = r.prompt_tokens
            if r.cost_weight is not None:
                cw[i] = r.cost_weight
            if r.budget is not None:
                budget[i] = r.budget
            if r.allowed is not None:
                allowed[i, :len(r.allowed)] = r.allowed
                allowed[i, len(r.allowed):] = False
            book[i] = r.book and self.cfg.book_load
        h = self.router.head
        state = self.state.replace(clock=np.float32(time.monotonic() - self.t0))
        out = _serve_route()(
            self.router.encoder.params, None if h is None else h.params,
            None if h is None else np.asarray(h.centroids), self.fs.params, state, ids, mask, pt, book, cw,
            budget, allowed, float(pol.alpha), float(pol.beta), float(pol.tau),
            enc_config=self.router.encoder.config, head_shape=None if h is None else (h.hidden, h.features),
            mode=self.router.feature_mode, fb_hidden=int(self.fs.params["Dense_0"]["kernel"].shape[1]))
        d, domain, x, fb, eligible = out
        if commit and n and book.any():
            self.state = state.replace(free_at=d.free_at)
        host = jax.device_get({"arm": d.arm, "quality": d.quality, "tokens": d.tokens, "cost": d.cost,
                               "uncertainty": d.uncertainty, "wait": d.wait, "penalty": d.penalty,
                               "score": d.score, "domain": domain, "x": x, "fb": fb, "eligible": eligible})
        return host

    def _route_batch(self, reqs: list[RouteReq]) -> list:
        from mixllm_jax import encoder as enc_mod, feedback_log

        self._drain()
        n = len(reqs)
        B = _pow2_bucket(n, self.cfg.max_batch)
        L = enc_mod.padded_length(max(len(r.ids) for r in reqs), self.router.max_length, enc_mod.LENGTH_BUCKETS)
        ids, mask, _ = enc_mod.pad_batch([r.ids for r in reqs], L, B, self.router.encoder.pad_id)
        h = self._decide(ids, mask, reqs)
        names = {s: nm for nm, s in self.registry.slots.items()}
        slots = sorted(names)
        tags = self.router.head.tags if self.router.head is not None else None
        results, entries = [], []
        for i, r in enumerate(reqs):
            arm = int(h["arm"][i])
            if arm not in names or not h["eligible"][i, arm]:  # e.g. the LLMs it allowed were removed meanwhile
                results.append(ApiError(503, "no eligible LLM for this request (the LLMs it may use were "
                                             "removed); retry", "no_backend", headers={"Retry-After": "1"}))
                continue
            model = names[arm]
            rid = "req-" + uuid.uuid4().hex
            expl = {}
            for s in slots:
                score = float(h["score"][i, s])
                expl[names[s]] = {
                    "quality": float(h["quality"][i, s]), "tokens": float(h["tokens"][i, s]),
                    "cost": float(h["cost"][i, s]), "uncertainty": float(h["uncertainty"][i, s]),
                    "wait": float(h["wait"][i, s]), "penalty": float(h["penalty"][i, s]),
                    "feedback": float(h["fb"][i, s]), "score": score if math.isfinite(score) else None,
                    "eligible": bool(h["eligible"][i, s])}
            res = {"request_id": rid, "model": model,
                   "domain": None if tags is None or h["domain"] is None else tags[int(h["domain"][i])],
                   "explanation": expl}
            if r.kind == "chat":
                res["_backend"] = self.backends.get(model)
            results.append(res)
            entries.append((rid, feedback_log.Entry(
                x=np.asarray(h["x"][i], np.float32), slot=arm, arm_id=int(self.arm_id[arm]), model=model,
                prompt_tokens=float(r.prompt_tokens),
                log_tokens=float(np.log(max(float(h["tokens"][i, arm]), 1.0))))))
            self.metrics.decisions.labels(model).inc()
        self.features.put_many(entries)
        return results

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch.observe(n)
        self.metrics.batch_s.observe(seconds)

    # ---- async API used by the endpoints ------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[tuple[list, int]]:
        from mixllm_jax.router import truncate

        enc = self._tokenizer.encode_batch(texts)
        return [(truncate(e.ids, self.router.max_length, self.router.truncation_side), len(e.ids)) for e in enc]

    async def route(self, texts: list[str], *, cost_weight=None, budget=None, allowed=None, book=True,
                    kind="route") -> list[dict]:
        from mixllm_jax.batcher import Overloaded

        b = self.batcher
        if b.pending + len(texts) > b.queue_limit:  # refuse before tokenizing
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"request queue is full ({b.pending} of {b.queue_limit} prompts waiting); "
                                f"retry later", "overloaded", headers={"Retry-After": str(int(b.retry_after()))})
        loop = asyncio.get_running_loop()
        toks = await loop.run_in_executor(self.aux, self.tokenize, texts)
        reqs = [RouteReq(ids, pt, cost_weight, budget, allowed, book, kind) for ids, pt in toks]
        try:
            self.metrics.queue.set(b.pending + len(reqs))
            return await b.submit(reqs)
        except Overloaded as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, str(e), "overloaded", headers={"Retry-After": str(int(e.retry_after))}) from None
        finally:
            self.metrics.queue.set(b.pending)

    async def journal_append(self, record: dict) -> int:
        return await asyncio.wrap_future(self.journal.append(record))

    def entry_live(self, e) -> bool:
        reg, arm_id = self.registry, self.arm_id
        return reg.slots.get(e.model) == e.slot and int(arm_id[e.slot]) == e.arm_id

    async def record_quality(self, rid: str, e, quality: float, source: str,
                             completion_tokens: float | None = None) -> int:
        from mixllm_jax import feedback_log

        tokens = completion_tokens if completion_tokens is not None else e.observed_tokens
        lt = float(np.log(max(tokens, 1.0))) if tokens is not None else e.log_tokens
        e.has_quality = True
        try:
            seq = await self.journal_append({"type": "quality", "rid": rid, "model": e.model, "slot": e.slot,
                                             "arm_id": e.arm_id, "quality": float(quality), "log_tokens": lt,
                                             "source": source, "x": feedback_log.encode_x(e.x)})
        except BaseException:
            e.has_quality = False
            raise
        self.metrics.feedback.labels("backend_failure" if source == "backend_failure" else "quality").inc()
        return seq

    async def record_thumbs(self, rid: str, e, up: bool) -> int:
        from mixllm_jax import feedback_log

        e.has_thumbs = True
        try:
            seq = await self.journal_append({"type": "thumbs", "rid": rid, "model": e.model, "slot": e.slot,
                                             "arm_id": e.arm_id, "reward": 1.0 if up else 0.0,
                                             "x": feedback_log.encode_x(e.x)})
        except BaseException:
            e.has_thumbs = False
            raise
        self.metrics.feedback.labels("thumbs").inc()
        return seq

    def record_usage(self, rid: str, model: str, usage: dict | None, latency_s: float, ttft_s: float | None,
                     approx_tokens: int | None = None) -> None:
        """Observed usage of a proxied call: journaled (not awaited: nobody waits on it)."""
        e = self.features.get(rid)
        ct = pt = None
        if isinstance(usage, dict):
            ct = usage.get("completion_tokens") if _is_num(usage.get("completion_tokens")) else None
            pt = usage.get("prompt_tokens") if _is_num(usage.get("prompt_tokens")) else None
        approx = ct is None and approx_tokens is not None
        if approx:
            ct = approx_tokens
        if e is not None and ct is not None:
            e.observed_tokens = float(ct)
        self.metrics.feedback.labels("usage").inc()
        self.metrics.backend_s.labels(model).observe(latency_s)
        rec = {"type": "usage", "rid": rid, "model": model, "completion_tokens": ct, "prompt_tokens": pt,
               "tokens_approximate": approx, "latency_s": round(latency_s, 6),
               "ttft_s": None if ttft_s is None else round(ttft_s, 6)}
        fut = self.journal.append(rec)
        fut.add_done_callback(lambda f: f.exception() and log.error("usage record lost: %s", f.exception()))

    async def add_model(self, spec: dict) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._add_model, spec)

    def _add_model(self, spec: dict) -> dict:
        from mixllm_jax.state import add_llm

        self._drain()
        name = spec["name"]
        if name in self.registry.slots:
            raise ApiError(409, f"model {name!r} is already registered (slot {self.registry.slots[name]}); "
                                f"DELETE it first to replace it", param="name")
        try:  # dry run: the state functions check prices, latency profile and prior
            add_llm(self.state, self.registry, name, price_in=spec["price_in"], price_out=spec["price_out"],
                    ttft=spec["ttft_s"], tokens_per_s=spec["tokens_per_s"],
                    max_concurrency=spec["max_concurrency"], prior=spec["prior"])
        except ValueError as e:
            raise ApiError(422, f"cannot add model {name!r}: {e}") from None
        self.journal.append(dict(spec, type="add_model")).result()
        self._drain()
        return self.model_info(name)

    async def remove_model(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.worker, self._remove_model, name)

    def _remove_model(self, name: str) -> None:
        self._drain()
        if name not in self.registry.slots:
            raise ApiError(404, f"model {name!r} is not registered (known: {self.registry.names})",
                           "not_found", param="name")
        if len(self.registry.slots) == 1:
            raise ApiError(409, f"model {name!r} is the last one; the router needs at least one LLM")
        self.journal.append({"type": "remove_model", "name": name}).result()
        self._drain()

    def model_info(self, name: str) -> dict:
        st, reg = self.state, self.registry
        s = reg.slots[name]
        b = self.backends.get(name)
        return {"id": name, "object": "model", "owned_by": "mixllm-jax", "slot": s,
                "price_in_per_mtok": _f32(float(st.price_in[s]) * 1e6),
                "price_out_per_mtok": _f32(float(st.price_out[s]) * 1e6),
                "ttft_s": _f32(st.ttft[s]), "tokens_per_s": _f32(st.tokens_per_s[s]),
                "max_concurrency": int(st.max_concurrency[s]), "observations": float(st.count[s]),
                "backend": None if b is None else {k: v for k, v in b.public().items() if k != "api_key_env"}}

    def _models(self) -> list[dict]:
        self._drain()  # read your writes: acknowledged feedback is counted
        return [self.model_info(n) for n in self.registry.names]

    async def models(self) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._models)

    # ---- checkpoints ------------------------------------------------------------------------

    def _snapshot(self):
        import dataclasses as dc

        from mixllm_jax.state import ArmRegistry

        self._drain()
        router = dc.replace(self.router, state=self.state, registry=ArmRegistry.from_dict(self.registry.to_dict()))
        return router, {"feedback": self.fs, "journal_seq": np.asarray(self.applied_seq, np.int64),
                        "arm_id": np.asarray(self.arm_id, np.int64)}, self.applied_seq

    async def checkpoint(self, force: bool = False) -> int | None:
        """Save a checkpoint if anything was applied since the last one (or `force`); returns the step."""
        from mixllm_jax import checkpoint, feedback_log

        loop = asyncio.get_running_loop()
        async with self._ckpt_lock:
            router, extras, seq = await loop.run_in_executor(self.worker, self._snapshot)
            if seq == self.ckpt_seq and not force:
                return None
            await loop.run_in_executor(self.aux, feedback_log.write_json_atomic,
                                       self.cfg.log_path / "live_models.json",
                                       {n: b.public() for n, b in self.live_backends.items()})
            step = await loop.run_in_executor(self.aux, functools.partial(
                checkpoint.save_router, router, self.cfg.checkpoint, keep=self.cfg.keep_checkpoints, extras=extras))
            self.features.flush()
            self.journal.rotate()
            self.journal.prune(self.prev_ckpt_seq)  # one checkpoint of slack
            self.prev_ckpt_seq, self.ckpt_seq, self.ckpt_step = self.ckpt_seq, seq, step
            self.metrics.ckpts.inc()
            self.metrics.ckpt_step.set(step)
            log.info("checkpoint step %d saved at journal seq %d", step, seq)
            return step

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.checkpoint_every_s)
            try:
                await self.checkpoint()
            except Exception:
                log.exception("periodic checkpoint failed (the journal keeps every record; retrying later)")

    def health(self) -> dict:
        fn = _serve_route()
        return {"status": "ok", "models": self.registry.names, "queue": self.batcher.pending,
                "proxy_inflight": self.proxy_inflight,
                "journal_seq": self.journal.seq, "applied_seq": self.applied_seq,
                "checkpoint_step": self.ckpt_step, "checkpoint_seq": self.ckpt_seq,
                "replayed": self.replayed, "features": len(self.features), "capacity": self.state.capacity,
                "compiled_route_shapes": fn._cache_size() if hasattr(fn, "_cache_size") else None,
                "uptime_s": round(time.monotonic() - self.t0, 3)}


def _f32(v) -> float:
    """A float32 state value shown without float32 noise (7 significant digits)."""
    return float(f"{float(v):.7g}")


def _reset_load(state, clock: float):
    """Fresh load model at `clock`: every live arm's serving slots free now."""
    import jax.numpy as jnp

    C = state.load_slots
    free = jnp.where(jnp.arange(C)[None, :] < state.max_concurrency[:, None], jnp.float32(clock), jnp.inf)
    free = jnp.where(state.active[:, None], free, jnp.inf)
    return state.replace(clock=jnp.asarray(clock, jnp.float32), free_at=free.astype(jnp.float32))


def _fit_arm_id(arm_id: np.ndarray, K: int) -> np.ndarray:
    arm_id = np.asarray(arm_id, np.int64)
    if len(arm_id) < K:
        arm_id = np.concatenate([arm_id, np.full(K - len(arm_id), -1, np.int64)])
    return arm_id


def _fit_feedback(fs, K: int):
    """Pad the feedback network's output layer (and reset its optimizer) to K arms."""
    import jax.numpy as jnp

    from mixllm_jax import feedback

    k2 = fs.params["Dense_2"]
    have = k2["kernel"].shape[1]
    if have == K:
        return fs
    if have > K:
        raise ValueError(f"feedback network has {have} arms, more than the state's {K}")
    params = dict(fs.params)
    params["Dense_2"] = {"kernel": jnp.pad(jnp.asarray(k2["kernel"]), ((0, 0), (0, K - have))),
                         "bias": jnp.pad(jnp.asarray(k2["bias"]), (0, K - have))}
    return fs._replace(params=params, opt_state=feedback._optimizer().init(params))


def _reset_feedback_slot(fs, slot: int):
    """A new LLM in a reused slot starts with a zero feedback term."""
    params = dict(fs.params)
    k2 = params["Dense_2"]
    params["Dense_2"] = {"kernel": k2["kernel"].at[:, slot].set(0.0), "bias": k2["bias"].at[slot].set(0.0)}
    return fs._replace(params=params)


def _read_live_backends(path: Path) -> dict[str, Backend]:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        return {n: parse_backend(b, f"{path}: {n!r}") for n, b in doc.items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is damaged ({e}); fix or delete it") from e


# ---------------------------------------------------------------------------------------------
# HTTP layer


def _error_response(status: int, message: str, type: str, param=None, headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type, "param": param}}, status_code=status,
                        headers=headers)


def _message_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type") == "text":
                if not isinstance(p.get("text"), str):
                    raise ApiError(422, f"{where}.content[{j}].text must be a string", param=f"{where}.content")
                parts.append(p["text"])
            elif isinstance(p, dict) and isinstance(p.get("type"), str):
                continue  # images etc.: not routed on
            else:
                raise ApiError(422, f"{where}.content[{j}] must be a string or a typed content part",
                               param=f"{where}.content")
        return "\n".join(parts)
    raise ApiError(422, f"{where}.content must be a string, a list of content parts or null, "
                        f"got {type(content).__name__}", param=f"{where}.content")


def routing_text(messages: Any, route_on: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "field 'messages' must be a non-empty list of messages", param="messages")
    texts = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(422, f"{where} must be an object with 'role' and 'content'", param="messages")
        if not isinstance(m.get("role"), str):
            raise ApiError(422, f"{where}.role must be a string", param="messages")
        texts.append((m["role"], _message_text(m.get("content"), where)))
    if route_on == "last_user":
        for role, t in reversed(texts):
            if role == "user" and t.strip():
                return t
    return "\n".join(f"{role}: {t}" for role, t in texts if t)


def create_app(checkpoint: str | Path, backends: str | Path | None = None, **options):
    """The ASGI app (Starlette). Options: the fields of `ServeConfig` (window_ms, max_batch,
    queue_limit, log_dir, checkpoint_every_s, ...). The router is restored, and the journal replayed,
    at startup (the lifespan), before the server accepts connections; shutdown checkpoints."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    cfg = ServeConfig(checkpoint=checkpoint, backends=backends, **options)
    cfg.check()
    svc = RouterService(cfg)
    m = svc.metrics

    def endpoint(label: str):
        def wrap(fn):
            @functools.wraps(fn)
            async def handler(request):
                t = time.perf_counter()
                status = 500
                try:
                    if not svc.started:
                        raise ApiError(503, "the router is starting or stopping", "unavailable",
                                       headers={"Retry-After": "1"})
                    resp = await fn(request)
                    status = resp.status_code
                    return resp
                except ApiError as e:
                    status = e.status
                    return _error_response(e.status, e.message, e.type, e.param, e.headers)
                except Exception as e:  # noqa: BLE001
                    log.exception("%s failed", label)
                    return _error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")
                finally:
                    m.http.labels(label, str(status)).inc()
                    m.http_s.labels(label).observe(time.perf_counter() - t)
            return handler
        return wrap

    def policy_fields(body: dict):
        cw = get_number(body, "cost_weight", lo=0)
        budget = get_number(body, "budget", lo=0, lo_open=True)
        return cw, budget

    def check_prompt(p, where):
        if not isinstance(p, str):
            raise ApiError(422, f"{where} must be a string, got {type(p).__name__}", param="prompt")
        if not p.strip():
            raise ApiError(422, f"{where} is empty", param="prompt")
        if len(p) > cfg.max_prompt_chars:
            raise ApiError(413, f"{where} has {len(p)} characters, more than the limit of {cfg.max_prompt_chars}",
                           param="prompt")
        return p

    @endpoint("route")
    async def route(request):
        body = await read_json_object(request, cfg.max_body_bytes)
        _reject_unknown(body, {"prompt", "cost_weight", "budget", "book_load"})
        if "prompt" not in body:
            raise ApiError(422, "field 'prompt' is required (a string or a list of strings)", param="prompt")
        p = body["prompt"]
        single = isinstance(p, str)
        if single:
            prompts = [check_prompt(p, "prompt")]
        elif isinstance(p, list):
            if not p:
                raise ApiError(422, "field 'prompt' is an empty list", param="prompt")
            limit = min(cfg.max_prompts, cfg.queue_limit)
            if len(p) > limit:
                raise ApiError(413, f"field 'prompt' has {len(p)} prompts, more than the limit of {limit} "
                                    f"per request", param="prompt")
            prompts = [check_prompt(x, f"prompt[{i}]") for i, x in enumerate(p)]
        else:
            raise ApiError(422, f"field 'prompt' must be a string or a list of strings, got {type(p).__name__}",
                           param="prompt")
        cw, budget = policy_fields(body)
        book = body.get("book_load", True)
        if not isinstance(book, bool):
            raise ApiError(422, "field 'book_load' must be true or false", param="book_load")
        out = await svc.route(prompts, cost_weight=cw, budget=budget, book=book)
        return JSONResponse(out[0] if single else {"routes": out})

    @endpoint("feedback")
    async def feedback_ep(request):
        body = await read_json_object(request, cfg.max_body_bytes)
        _reject_unknown(body, {"request_id", "quality", "thumbs", "completion_tokens"})
        rid = get_string(body, "request_id", default=..., max_len=200)
        quality = get_number(body, "quality", lo=0, hi=1)
        ct = get_number(body, "completion_tokens", lo=0, integer=True)
        thumbs = body.get("thumbs")
        if thumbs is not None and thumbs not in ("up", "down"):
            raise ApiError(422, f"field 'thumbs' must be \"up\" or \"down\", got {json.dumps(thumbs)[:40]}",
                           param="thumbs")
        if quality is None and thumbs is None:
            raise ApiError(422, "give 'quality' (a number in [0, 1]) or 'thumbs' (\"up\"/\"down\")")
        e = svc.features.get(rid)
        if e is None:
            raise ApiError(404, f"unknown request id {rid!r}: never issued, or older than the last "
                                f"{cfg.feature_cache} routed requests", "not_found", param="request_id")
        if not svc.entry_live(e):
            raise ApiError(409, f"model {e.model!r} that served request {rid!r} has been removed; "
                                f"feedback not applied", param="request_id")
        if quality is not None and e.has_quality:
            raise ApiError(409, f"request {rid!r} already has a quality observation", param="quality")
        if thumbs is not None and e.has_thumbs:
            raise ApiError(409, f"request {rid!r} already has a thumbs up/down", param="thumbs")
        recorded = []
        if quality is not None:
            seq = await svc.record_quality(rid, e, quality, "user", None if ct is None else float(ct))
            recorded.append({"kind": "quality", "seq": seq})
        if thumbs is not None:
            seq = await svc.record_thumbs(rid, e, thumbs == "up")
            recorded.append({"kind": "thumbs", "seq": seq})
        return JSONResponse({"request_id": rid, "model": e.model, "recorded": recorded})

    @endpoint("models")
    async def models_list(request):
        return JSONResponse({"object": "list", "data": await svc.models()})

    @endpoint("models_add")
    async def models_add(request):
        body = await read_json_object(request, cfg.max_body_bytes)
        known = {"name", "price_in_per_mtok", "price_out_per_mtok", "ttft_s", "tokens_per_s", "max_concurrency",
                 "prior", "backend"}
        _reject_unknown(body, known)
        name = get_string(body, "name", default=...)
        pin = get_number(body, "price_in_per_mtok", default=..., lo=0)
        pout = get_number(body, "price_out_per_mtok", default=..., lo=0)
        ttft = get_number(body, "ttft_s", default=0.5, lo=0)
        tps = get_number(body, "tokens_per_s", default=50.0, lo=0, lo_open=True)
        conc = get_number(body, "max_concurrency", default=8, lo=1, hi=svc.state.load_slots, integer=True)
        prior = body.get("prior", "uninformative")
        if not (prior in ("uninformative", "mean") or (_is_num(prior) and math.isfinite(prior))):
            raise ApiError(422, f"field 'prior' must be \"uninformative\", \"mean\" or a finite number (the "
                                f"prior quality), got {json.dumps(prior)[:40]}", param="prior")
        backend = None
        if body.get("backend") is not None:
            try:
                backend = parse_backend(body["backend"], "backend").public()
            except ValueError as e:
                raise ApiError(422, str(e), param="backend") from None
        spec = {"name": name, "price_in": pin * 1e-6, "price_out": pout * 1e-6, "ttft_s": float(ttft),
                "tokens_per_s": float(tps), "max_concurrency": int(conc),
                "prior": prior if isinstance(prior, str) else float(prior), "backend": backend}
        info = await svc.add_model(spec)
        return JSONResponse(info, status_code=201)

    @endpoint("models_remove")
    async def models_remove(request):
        name = request.path_params["name"]
        await svc.remove_model(name)
        return JSONResponse({"removed": name})

    @endpoint("metrics")
    async def metrics(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        m.queue.set(svc.batcher.pending)
        return Response(m.render(), media_type=CONTENT_TYPE_LATEST)

    @endpoint("healthz")
    async def healthz(request):
        return JSONResponse(svc.health())

    @endpoint("chat")
    async def chat(request):
        body = await read_json_object(request, cfg.max_body_bytes)
        if "messages" not in body:
            raise ApiError(422, "field 'messages' is required", param="messages")
        text = routing_text(body["messages"], cfg.route_on)
        if not text.strip():
            raise ApiError(422, "the messages hold no text to route on", param="messages")
        if len(text) > cfg.max_prompt_chars:
            raise ApiError(413, f"the text routed on has {len(text)} characters, more than the limit of "
                                f"{cfg.max_prompt_chars}", param="messages")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "field 'stream' must be true or false", param="stream")
        cw, budget = policy_fields(body)
        if svc.proxy_inflight >= cfg.max_inflight_proxy:
            m.rejected.labels("proxy_busy").inc()
            raise ApiError(503, f"{svc.proxy_inflight} proxied calls in flight, the limit; retry later",
                           "overloaded", headers={"Retry-After": "1"})
        mask = svc._backend_mask
        if not mask.any():
            raise ApiError(503, "no live LLM has a backend configured (backends.yaml or POST /v1/models)",
                           "no_backend")
        svc.proxy_inflight += 1
        handed_off = False  # a streaming answer releases its slot when the stream ends
        try:
            [res] = await svc.route([text], cost_weight=cw, budget=budget, allowed=mask.copy(), kind="chat")
            resp = await proxy(body, res, stream)
            handed_off = isinstance(resp, StreamingResponse)
            return resp
        finally:
            if not handed_off:
                svc.proxy_inflight -= 1

    async def failed(rid, model, reason, message, status):
        m.backend_fail.labels(model, reason).inc()
        e = svc.features.get(rid)
        note = ""
        if e is not None and not e.has_quality and svc.entry_live(e):
            await svc.record_quality(rid, e, 0.0, "backend_failure")
            note = f"; recorded as quality 0 for {model!r}"
        return ApiError(status, message + note, "backend_error",
                        headers={"x-mixllm-request-id": rid, "x-mixllm-model": model})

    async def proxy(body: dict, res: dict, stream: bool):
        import httpx

        rid, model = res["request_id"], res["model"]
        backend: Backend | None = res.get("_backend")
        if backend is None:
            raise await failed(rid, model, "no_backend", f"model {model!r} has no backend configured", 502)
        payload = {k: v for k, v in body.items() if k not in ("cost_weight", "budget")}
        payload["model"] = backend.model or model
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if backend.api_key_env:
            key = os.environ.get(backend.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
        url = backend.base_url + "/chat/completions"
        mh = {"x-mixllm-request-id": rid, "x-mixllm-model": model}
        content = json.dumps(payload).encode()
        t0 = time.perf_counter()
        try:
            req = svc.http.build_request("POST", url, content=content, headers=headers,
                                         timeout=httpx.Timeout(backend.timeout_s))
            resp = await svc.http.send(req, stream=True)
        except httpx.TimeoutException:
            raise await failed(rid, model, "timeout", f"backend of {model!r} ({url}) timed out after "
                                                      f"{backend.timeout_s:g} s", 504) from None
        except httpx.HTTPError as e:
            raise await failed(rid, model, "connect", f"backend of {model!r} ({url}) failed: "
                                                      f"{type(e).__name__}: {e}", 502) from None
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        if not stream or resp.status_code != 200 or not sse:  # a whole answer (JSON), even if asked to stream
            try:
                raw = await resp.aread()
            except httpx.TimeoutException:
                await resp.aclose()
                raise await failed(rid, model, "timeout", f"backend of {model!r} ({url}) timed out after "
                                                          f"{backend.timeout_s:g} s", 504) from None
            except httpx.HTTPError as e:
                await resp.aclose()
                raise await failed(rid, model, "read", f"backend of {model!r} ({url}) failed mid-answer: "
                                                       f"{type(e).__name__}: {e}", 502) from None
            await resp.aclose()
            latency = time.perf_counter() - t0
            if resp.status_code >= 500:
                raise await failed(rid, model, f"http_{resp.status_code}",
                                   f"backend of {model!r} ({url}) answered HTTP {resp.status_code}: "
                                   f"{raw[:300].decode('utf-8', 'replace')}", 502)
            if resp.status_code >= 400:  # the request's fault, not the LLM's: passed through as is
                return Response(raw, status_code=resp.status_code, headers=mh,
                                media_type=resp.headers.get("content-type", "application/json"))
            try:
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise await failed(rid, model, "bad_json", f"backend of {model!r} ({url}) answered invalid "
                                                           f"JSON ({e})", 502) from None
            svc.record_usage(rid, model, data.get("usage"), latency, None)
            data["mixllm"] = {"request_id": rid, "model": model}
            return JSONResponse(data, headers=mh)

        async def relay():
            ttft = None
            buf = b""
            usage = None
            deltas = 0
            ok = False
            try:
                async for chunk in resp.aiter_raw():
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.startswith(b"data:"):
                            data = line[5:].strip()
                            if data and data != b"[DONE]":
                                try:
                                    obj = json.loads(data)
                                except ValueError:
                                    continue
                                if isinstance(obj, dict):
                                    if isinstance(obj.get("usage"), dict):
                                        usage = obj["usage"]
                                    for c in obj.get("choices") or []:
                                        if isinstance(c, dict) and (c.get("delta") or {}).get("content"):
                                            deltas += 1
                    yield chunk
                ok = True
            except httpx.HTTPError as e:
                reason = "timeout" if isinstance(e, httpx.TimeoutException) else "read"
                err = await failed(rid, model, reason, f"backend of {model!r} ({url}) failed mid-stream: "
                                                       f"{type(e).__name__}: {e}", 502)
                yield ("data: " + json.dumps({"error": {"message": err.message, "type": err.type}})
                       + "\n\n").encode()
            finally:
                release()
                await resp.aclose()
                if ok:
                    svc.record_usage(rid, model, usage, time.perf_counter() - t0, ttft, approx_tokens=deltas)

        released = False

        def release():  # once: when the stream ends, or when a stream never started is collected
            nonlocal released
            if not released:
                released = True
                svc.proxy_inflight -= 1

        gen = relay()
        weakref.finalize(gen, release)
        return StreamingResponse(gen, status_code=200, headers=mh,
                                 media_type=resp.headers.get("content-type", "text/event-stream"))

    async def not_found(request, exc):
        if isinstance(exc, HTTPException):
            msg = {404: f"no endpoint {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
            return _error_response(exc.status_code, msg, "not_found" if exc.status_code == 404 else
                                   "invalid_request_error", headers=getattr(exc, "headers", None))
        return _error_response(500, "internal error", "server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = Starlette(routes=[
        Route("/v1/route", route, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/feedback", feedback_ep, methods=["POST"]),
        Route("/v1/models", models_list, methods=["GET"]),
        Route("/v1/models", models_add, methods=["POST"]),
        Route("/v1/models/{name:path}", models_remove, methods=["DELETE"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.service = svc
    return app


def _graceful_exit(signum, frame):
    raise SystemExit(0)


def serve_main(checkpoint: str | Path, backends: str | Path | None = None, host: str = "127.0.0.1",
               port: int = 8000, window_ms: float = 3.0, max_batch: int = 64, queue_limit: int = 1024,
               log_dir: str | Path | None = None, checkpoint_every_s: float = 60.0, **options) -> None:
    """Run the router service on uvicorn until SIGINT/SIGTERM (which checkpoint before exiting).

    Further options: the other fields of `ServeConfig` (max_prompt_chars, max_prompts, feature_cache,
    max_inflight_proxy, route_on, book_load, warmup, keep_checkpoints, compilation_cache, ...).
    """
    import uvicorn

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(checkpoint, backends, host=host, port=port, window_ms=window_ms, max_batch=max_batch,
                     queue_limit=queue_limit, log_dir=log_dir, checkpoint_every_s=checkpoint_every_s, **options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=30, backlog=2048, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful shutdown (final checkpoint included), with the
        # handler found at start: make that handler a clean exit, so a graceful stop exits 0.
        signal.signal(signal.SIGTERM, _graceful_exit)
    server.run()
    if not app.state.service.ever_started:  # e.g. the router could not be restored: logged above
        raise SystemExit(1)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` command's options (for cli.py and `python -m mixllm_jax.server`)."""
    d = ServeConfig(checkpoint="")
    p.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory (restored, and saved into)")
    p.add_argument("--backends", default=None, help="backends.yaml: LLM name -> OpenAI-compatible base_url")
    p.add_argument("--host", default=d.host, help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port")
    p.add_argument("--window-ms", type=float, default=d.window_ms, help="micro-batch window (ms)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="prompts per routing call, at most")
    p.add_argument("--queue-limit", type=int, default=d.queue_limit, help="prompts waiting, at most (then 429)")
    p.add_argument("--log-dir", default=None, help="journal and request logs (default: <checkpoint>.serve)")
    p.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s,
                   help="seconds between periodic Orbax checkpoints (also saved on SIGTERM)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoint steps kept")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="longer prompts are refused with 413")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts per /v1/route request")
    p.add_argument("--feature-cache", type=int, default=d.feature_cache,
                   help="routed requests whose features are kept for feedback")
    p.add_argument("--max-inflight-proxy", type=int, default=d.max_inflight_proxy,
                   help="proxied calls in flight, at most (then 503)")
    p.add_argument("--route-on", choices=ROUTE_ON, default=d.route_on,
                   help="what of a chat request is routed on: the last user message or the whole conversation")
    p.add_argument("--no-book-load", dest="book_load", action="store_false",
                   help="decisions do not book predicted load on the live load model")
    p.add_argument("--warmup", action="store_true", help="compile every batch/length shape before serving")
    p.add_argument("--compilation-cache", default="auto",
                   help="JAX persistent compilation cache dir ('auto': <log-dir>/jax-cache; 'off')")


def run_from_args(args: argparse.Namespace) -> None:
    serve_main(args.checkpoint, args.backends, host=args.host, port=args.port, window_ms=args.window_ms,
               max_batch=args.max_batch, queue_limit=args.queue_limit, log_dir=args.log_dir,
               checkpoint_every_s=args.checkpoint_every_s, keep_checkpoints=args.keep_checkpoints,
               max_prompt_chars=args.max_prompt_chars, max_prompts=args.max_prompts,
               feature_cache=args.feature_cache, max_inflight_proxy=args.max_inflight_proxy,
               route_on=args.route_on, book_load=args.book_load, warmup=args.warmup,
               compilation_cache=None if args.compilation_cache == "off" else args.compilation_cache)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixllm_jax.server", description=__doc__.split("\n")[0])
    add_serve_arguments(p)
    run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()

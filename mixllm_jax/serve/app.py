"""HTTP router service: micro-batched routing, an OpenAI-compatible proxy, live feedback and live LLMs.

    mixllm-jax serve --checkpoint checkpoints/router --backends backends.yaml [--port 8000]
    python -m mixllm_jax.serve --checkpoint ... (the same)

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

The package: config.py (ServeConfig and its CLI options), http.py (errors, request fields),
backends.py (backends, proxy, SSE relay), metrics.py, compute.py (the fused jitted computation),
service.py (the worker thread, journal, feedback, live LLMs, checkpoints) and this module (the
Starlette app and the entry point). The design and the math: docs/architecture.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mixllm_jax.latency import DEFAULT_MAX_CONCURRENCY, DEFAULT_TOKENS_PER_S, DEFAULT_TTFT_S
from mixllm_jax.serve.backends import parse_backend, proxy
from mixllm_jax.serve.config import ServeConfig, add_serve_arguments, config_from_args
from mixllm_jax.serve.http import (ApiError, check_prompt, error_response, get_bool, get_number, get_string,
                                   is_num, policy_fields, read_json_object, reject_unknown, routing_text)
from mixllm_jax.serve.metrics import CONTENT_TYPE_LATEST
from mixllm_jax.serve.service import RouterService

log = logging.getLogger(__name__)


def create_app(cfg: ServeConfig) -> Starlette:
    """The ASGI app. The router is restored, and the journal replayed, at startup (the lifespan),
    before the server accepts connections; shutdown checkpoints. app.state.service: the service."""
    cfg.check()
    svc = RouterService(cfg)
    m = svc.metrics

    def endpoint(label: str):
        """Answer ApiError as an OpenAI-style error, anything else as a 500; count and time each call."""
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
                    return error_response(e.status, e.message, e.type, e.param, e.headers)
                except Exception as e:  # noqa: BLE001
                    log.exception("%s failed", label)
                    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")
                finally:
                    m.http.labels(label, str(status)).inc()
                    m.http_s.labels(label).observe(time.perf_counter() - t)
            return handler
        return wrap

    @endpoint("route")
    async def route(request):
        body = await read_json_object(request, cfg.max_body_bytes)
        reject_unknown(body, {"prompt", "cost_weight", "budget", "book_load"})
        if "prompt" not in body:
            raise ApiError(422, "field 'prompt' is required (a string or a list of strings)", param="prompt")
        p = body["prompt"]
        single = isinstance(p, str)
        if single:
            prompts = [check_prompt(p, "prompt", cfg.max_prompt_chars)]
        elif isinstance(p, list):
            if not p:
                raise ApiError(422, "field 'prompt' is an empty list", param="prompt")
            limit = min(cfg.max_prompts, cfg.queue_limit)
            if len(p) > limit:
                raise ApiError(413, f"field 'prompt' has {len(p)} prompts, more than the limit of {limit} "
                                    f"per request", param="prompt")
            prompts = [check_prompt(x, f"prompt[{i}]", cfg.max_prompt_chars) for i, x in enumerate(p)]
        else:
            raise ApiError(422, f"field 'prompt' must be a string or a list of strings, got {type(p).__name__}",
                           param="prompt")
        cw, budget = policy_fields(body)
        book = get_bool(body, "book_load", True)
        out = await svc.route(prompts, cost_weight=cw, budget=budget, book=book)
        return JSONResponse(out[0] if single else {"routes": out})

    @endpoint("feedback")
    async def feedback(request):
        body = await read_json_object(request, cfg.max_body_bytes)
        reject_unknown(body, {"request_id", "quality", "thumbs", "completion_tokens"})
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
        reject_unknown(body, known)
        name = get_string(body, "name", default=...)
        pin = get_number(body, "price_in_per_mtok", default=..., lo=0)
        pout = get_number(body, "price_out_per_mtok", default=..., lo=0)
        ttft = get_number(body, "ttft_s", default=DEFAULT_TTFT_S, lo=0)
        tps = get_number(body, "tokens_per_s", default=DEFAULT_TOKENS_PER_S, lo=0, lo_open=True)
        conc = get_number(body, "max_concurrency", default=DEFAULT_MAX_CONCURRENCY, lo=1, hi=svc.state.load_slots,
                          integer=True)
        prior = body.get("prior", "uninformative")
        if not (prior in ("uninformative", "mean") or (is_num(prior) and math.isfinite(prior))):
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
        stream = get_bool(body, "stream", False)
        cw, budget = policy_fields(body)
        if svc.proxy_inflight >= cfg.max_inflight_proxy:
            m.rejected.labels("proxy_busy").inc()
            raise ApiError(503, f"{svc.proxy_inflight} proxied calls in flight, the limit; retry later",
                           "overloaded", headers={"Retry-After": "1"})
        mask = svc.backend_mask
        if not mask.any():
            raise ApiError(503, "no live LLM has a backend configured (backends.yaml or POST /v1/models)",
                           "no_backend")
        svc.proxy_inflight += 1
        handed_off = False  # a streaming answer releases its slot when the stream ends
        try:
            [res] = await svc.route([text], cost_weight=cw, budget=budget, allowed=mask.copy(), kind="chat")
            resp = await proxy(svc, body, res, stream)
            handed_off = isinstance(resp, StreamingResponse)
            return resp
        finally:
            if not handed_off:
                svc.proxy_inflight -= 1

    async def not_found(request, exc):
        if isinstance(exc, HTTPException):
            msg = {404: f"no endpoint {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
            return error_response(exc.status_code, msg, "not_found" if exc.status_code == 404 else
                                  "invalid_request_error", headers=getattr(exc, "headers", None))
        return error_response(500, "internal error", "server_error")

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
        Route("/v1/feedback", feedback, methods=["POST"]),
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


def run(cfg: ServeConfig) -> None:
    """Run the router service on uvicorn until SIGINT/SIGTERM (which checkpoint before exiting)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=30, backlog=2048, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful shutdown (final checkpoint included), with the
        # handler found at start: make that handler a clean exit, so a graceful stop exits 0.
        signal.signal(signal.SIGTERM, _graceful_exit)
    server.run()
    if not app.state.service.ever_started:  # e.g. the router could not be restored: logged above
        raise SystemExit(1)


def main(argv=None) -> None:
    """`python -m mixllm_jax.serve`: the options of `mixllm-jax serve`."""
    p = argparse.ArgumentParser(prog="python -m mixllm_jax.serve", description=__doc__.split("\n")[0])
    add_serve_arguments(p)
    run(config_from_args(p.parse_args(argv)))

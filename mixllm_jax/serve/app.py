"""HTTP router service: micro-batched routing, an OpenAI-compatible proxy, live feedback and live LLMs.

    mixllm-jax serve --checkpoint checkpoints/router --backends backends.yaml [--api-keys keys.yaml]
    python -m mixllm_jax.serve --checkpoint ... (the same)

Endpoints (JSON bodies need ``Content-Type: application/json``; errors are ``{"error": {"message",
"type", "param", "code"}}`` with a 4xx/5xx status). With --api-keys each needs a key
(``Authorization: Bearer <key>``) with the role in brackets (auth.py); admin may call all:

  POST /v1/route [route]     {"prompt": str | [str], "model"?, "cost_weight"?: [0, 1e12],
                              "max_cost_usd"?: USD in (0, 1e6], "allowed_models"?: [llm],
                              "blocked_models"?: [llm], "book_load"?: bool (default false)}
                             -> one route object, or {"routes": [route, ...]} for a list:
                             {"request_id", "model", "domain", "explanation": {llm: {"quality",
                              "tokens", "cost", "uncertainty", "wait", "penalty", "feedback",
                              "score", "eligible"}}} (+ "booked" when book_load: booking.py)
  POST /v1/chat/completions [route]  OpenAI body; "model": "mixllm" | "mixllm:budget=<share>" |
                             "mixllm:cost_weight=<lambda>" | an LLM (pinned); + optional
                             "cost_weight", "max_cost_usd", "allowed_models", "blocked_models"
                             (gateway.py). Routes the last user message (or the conversation, see
                             route_on), forwards to the chosen LLM's backend (falling back to the
                             next-best on a backend failure), streaming (SSE) passed through. The
                             answer carries headers x-mixllm-request-id / x-mixllm-model /
                             x-mixllm-attempts (and a "mixllm" field when not streaming). Usage,
                             cost and latency are recorded for that request and its API key.
  POST /v1/feedback [feedback]  {"request_id", "quality"?: [0, 1], "thumbs"?: "up" | "down",
                              "completion_tokens"?: int} -> {"request_id", "model", "recorded": [...]};
                             each request takes one quality and one thumbs, ever (409 after).
  GET  /v1/models [route]    {"object": "list", "data": [router alias, llm, ...]} (no backend URLs)
  GET  /v1/usage [route]     spend and decisions of the caller's key (admin: of every key)
  POST /v1/models [admin]    {"name", "price_in_per_mtok", "price_out_per_mtok", "ttft_s"?,
                              "tokens_per_s"?, "max_concurrency"?, "prior"?, "backend"?: {"base_url"
                              (a host on the backends file's allow_hosts), "model"?, "timeout_s"?,
                              "context_window"?}}
                             -> 201 model
  DELETE /v1/models/{name} [admin]  -> {"removed": name}
  GET  /metrics [admin]      Prometheus text format
  GET  /healthz              liveness, for anyone (any key or none): {"status": "ok"}; with a valid
                             key (or no keys file) the details, and with ?digest=1 [admin] a SHA-256
                             of the learned state
  GET  /readyz               readiness, for anyone: 200 {"status": "ready"} once the state is restored
                             and the journal replayed, else 503 (starting, stopping)

The package: options.py (ServeConfig and its CLI options), auth.py (API keys), http.py (errors,
request fields), protocol.py (connection timeouts), prometheus.py, compute.py (the decision's
inputs, state helpers); the components, wired and started by service.py: live.py (the live state),
applier.py (the journal's ordered applier), routing.py (the routing worker, batcher.py),
intake.py (feedback), live_models.py (live LLMs, backends.py), spend.py (spend, key budgets),
proxy.py and gateway.py (model field, candidates, fallbacks), snapshots.py (checkpoints, digest);
and this module (the Starlette app and the entry point). The design and the math:
docs/architecture.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mixllm_jax.serve.auth import Authenticator, AuthError, load_keys
from mixllm_jax.core.config import Budget
from mixllm_jax.core.engine import POLICY_RANGES
from mixllm_jax.core.policy import EXPLORE_MODES
from mixllm_jax.serve.backends import request_backend
from mixllm_jax.serve.cluster import ClusterUnavailable
from mixllm_jax.serve.options import ServeConfig, add_serve_arguments, config_from_args
from mixllm_jax.serve.http import (ApiError, FastJSONResponse, check_prompt, error_response, get_bool, get_number,
                                   get_string, read_json_object, reject_unknown, require_json, routing_text,
                                   model_spec, MODEL_LIMITS)
from mixllm_jax.serve.prometheus import CONTENT_TYPE_LATEST
from mixllm_jax.serve.protocol import GuardedHttpProtocol
from mixllm_jax.serve.live_models import MODEL_DEFAULTS
from mixllm_jax.serve.service import RouterService
from mixllm_jax.core.observation import MAX_TOKENS

# the policy fields PUT /v1/policy sets besides a budget (which sets cost_weight, mix_cost_weight, mix)
POLICY_FIELDS = {f: POLICY_RANGES[f] for f in ("alpha", "beta", "tau", "temperature", "epsilon")}

log = logging.getLogger(__name__)

GC_YOUNG = 20_000  # allocations between collections of the youngest generation (Python's default: 700)
AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="mixllm-jax"'}


class ServeStartupError(RuntimeError):
    """The service could not start (e.g. its checkpoint cannot be restored); the message says why."""


def create_app(cfg: ServeConfig) -> Starlette:
    """The ASGI app. The router is restored, and the journal replayed, at startup (the lifespan),
    before the server accepts connections; shutdown checkpoints. app.state.service: the service."""
    cfg.check()
    auth = Authenticator(load_keys(cfg.http.api_keys) if cfg.http.api_keys is not None else None)
    svc = RouterService(cfg)
    m = svc.metrics

    def endpoint(label: str, role: str | None, json_body: bool = False, needs_started: bool = True):
        """Check the caller's key for `role` (401/403) and, for a JSON endpoint, the content type
        (415) before anything is read; answer ApiError as an OpenAI-style error and anything else
        as a 500 that says no more than a reference into the log; count and time each call."""
        def wrap(fn):
            @functools.wraps(fn)
            async def handler(request):
                t = time.perf_counter()
                status = 500
                try:
                    if role is not None:
                        request.state.key = auth.check(request.headers.get("authorization"), role)
                    if needs_started and not svc.started:
                        raise ApiError(503, "the router is starting or stopping", "unavailable",
                                       headers={"Retry-After": "1"})
                    if json_body:
                        require_json(request)
                    resp = await fn(request)
                    status = resp.status_code
                    return resp
                except AuthError as e:
                    status = e.status
                    kind, code = (("authentication_error", "invalid_api_key") if e.status == 401
                                  else ("permission_error", "insufficient_permissions"))
                    return error_response(e.status, e.message, kind, None,
                                          AUTH_HEADERS if e.status == 401 else None, code)
                except ApiError as e:
                    status = e.status
                    return error_response(e.status, e.message, e.type, e.param, e.headers, e.code)
                except ClusterUnavailable as e:
                    status = 503
                    return error_response(503, f"{e}; state changes are refused until it is back, routing "
                                               f"goes on", "unavailable", headers={"Retry-After": "2"})
                except Exception:  # noqa: BLE001
                    ref = uuid.uuid4().hex[:12]
                    log.exception("%s failed (reference %s)", label, ref)
                    return error_response(500, f"internal error (reference {ref} in the server log)",
                                          "server_error")
                finally:
                    m.http.requests.labels(label, str(status)).inc()
                    m.http.seconds.labels(label).observe(time.perf_counter() - t)
            return handler
        return wrap

    def body_of(request):
        return read_json_object(request, cfg.http.max_body_bytes, cfg.http.body_timeout_s)

    @endpoint("route", "route", json_body=True)
    async def route(request):
        body = await body_of(request)
        reject_unknown(body, {"prompt", "model", "cost_weight", "max_cost_usd", "allowed_models", "blocked_models",
                              "book_load"})
        if "prompt" not in body:
            raise ApiError(422, "field 'prompt' is required (a string or a list of strings)", param="prompt")
        p = body["prompt"]
        single = isinstance(p, str)
        if single:
            prompts = [check_prompt(p, "prompt", cfg.limits.max_prompt_chars)]
        elif isinstance(p, list):
            if not p:
                raise ApiError(422, "field 'prompt' is an empty list", param="prompt")
            limit = min(cfg.limits.max_prompts, cfg.batching.queue_limit)
            if len(p) > limit:
                raise ApiError(413, f"field 'prompt' has {len(p)} prompts, more than the limit of {limit} "
                                    f"per request", param="prompt")
            prompts = [check_prompt(x, f"prompt[{i}]", cfg.limits.max_prompt_chars) for i, x in enumerate(p)]
        else:
            raise ApiError(422, f"field 'prompt' must be a string or a list of strings, got {type(p).__name__}",
                           param="prompt")
        pol = svc.gateway.request_policy(body, request.state.key)
        book = get_bool(body, "book_load", False)  # a route books load only when asked (booking.py)
        out = await svc.routing.route(prompts, point=pol.point, max_cost_usd=pol.max_cost_usd,
                                      allowed=pol.candidates, book=book, key=pol.key)
        return FastJSONResponse(out[0] if single else {"routes": out})

    @endpoint("feedback", "feedback", json_body=True)
    async def feedback(request):
        body = await body_of(request)
        reject_unknown(body, {"request_id", "quality", "thumbs", "completion_tokens"})
        rid = get_string(body, "request_id", default=..., max_len=200)
        quality = get_number(body, "quality", lo=0, hi=1)
        ct = get_number(body, "completion_tokens", lo=0, hi=MAX_TOKENS, integer=True)
        thumbs = body.get("thumbs")
        if thumbs is not None and thumbs not in ("up", "down"):
            raise ApiError(422, f"field 'thumbs' must be \"up\" or \"down\", got {json.dumps(thumbs)[:40]}",
                           param="thumbs")
        if quality is None and thumbs is None:
            raise ApiError(422, "give 'quality' (a number in [0, 1]) or 'thumbs' (\"up\"/\"down\")")
        e = await svc.intake.lookup(rid)
        if e is None:
            raise ApiError(404, f"unknown request id {rid[:80]!r}: never issued, or older than the last "
                                f"{cfg.limits.feature_cache} routed requests" +
                           (f" (on any replica: {cfg.cluster.decision_ttl_s:g} s)" if cfg.cluster.enabled else ""),
                           "not_found", param="request_id")
        if not svc.intake.entry_live(e):
            raise ApiError(409, f"model {e.model!r} that served request {rid!r} has been removed; "
                                f"feedback not applied", param="request_id")
        if quality is not None and e.has_quality:
            raise ApiError(409, f"request {rid!r} already has a quality observation", param="quality")
        if thumbs is not None and e.has_thumbs:
            raise ApiError(409, f"request {rid!r} already has a thumbs up/down", param="thumbs")
        records = []  # every check is done: the records are journaled together, or not at all
        if quality is not None:
            records.append(svc.intake.quality_record(rid, e, quality, "user", None if ct is None else float(ct)))
        if thumbs is not None:
            records.append(svc.intake.thumbs_record(rid, e, thumbs == "up"))
        seqs = await svc.intake.record_feedback(rid, e, records)
        return JSONResponse({"request_id": rid, "model": e.model,
                             "recorded": [{"kind": r["type"], "seq": q} for r, q in zip(records, seqs)]})

    @endpoint("models", "route")
    async def models_list(request):
        created = int(time.time() - (time.monotonic() - svc.live.t0))
        return JSONResponse({"object": "list", "data": svc.gateway.router_models(created) + await svc.models.models()})

    @endpoint("usage", "route")
    async def usage(request):
        key = request.state.key
        return JSONResponse(await svc.spend.usage(key, auth.keys))

    @endpoint("models_add", "admin", json_body=True)
    async def models_add(request):
        body = await body_of(request)
        spec = model_spec(body, svc.live.state.load_slots, MODEL_DEFAULTS)
        spec["backend"] = None
        if body.get("backend") is not None:
            spec["backend"] = request_backend(body["backend"], svc.models.backends_file).record()
        info = await svc.models.add_model(spec)
        return JSONResponse(info, status_code=201)

    @endpoint("models_reprice", "admin", json_body=True)
    async def models_reprice(request):
        body = await body_of(request)
        reject_unknown(body, {"price_in_per_mtok", "price_out_per_mtok"})
        lim = MODEL_LIMITS
        pin = get_number(body, "price_in_per_mtok", default=..., lo=lim["price_in_per_mtok"][0],
                         hi=lim["price_in_per_mtok"][1])
        pout = get_number(body, "price_out_per_mtok", default=..., lo=lim["price_out_per_mtok"][0],
                          hi=lim["price_out_per_mtok"][1])
        return JSONResponse(await svc.models.reprice_model(request.path_params["name"], pin * 1e-6, pout * 1e-6))

    @endpoint("policy", "route")
    async def policy_get(request):
        return JSONResponse(svc.routing.policy_view())

    @endpoint("policy_set", "admin", json_body=True)
    async def policy_set(request):
        """Body: at most one budget ('budget': a share such as "25%", 'budget_usd', 'cost_weight'; with
        an optional 'reference'), and/or any of the policy's fields (POLICY_FIELDS, 'explore')."""
        body = await body_of(request)
        reject_unknown(body, {"budget", "budget_usd", "cost_weight", "reference", "explore", "in_batch_load",
                              *POLICY_FIELDS})
        given = [k for k in ("budget", "budget_usd", "cost_weight") if k in body]
        fields = {k: get_number(body, k, default=..., lo=lo, hi=hi) for k, (lo, hi) in POLICY_FIELDS.items()
                  if k in body}
        if "in_batch_load" in body:
            fields["in_batch_load"] = get_bool(body, "in_batch_load", default=...)
        if "explore" in body:
            fields["explore"] = get_string(body, "explore", default=..., max_len=16)
            if fields["explore"] not in EXPLORE_MODES:
                raise ApiError(422, f"field 'explore' must be one of {list(EXPLORE_MODES)}, got "
                                    f"{fields['explore']!r}", param="explore")
        if len(given) > 1 or not (given or fields):
            raise ApiError(422, "give at most one of 'budget' (a share of the reference LLM's cost, e.g. \"25%\"), "
                                "'budget_usd' (mean USD per query) or 'cost_weight', and/or policy fields "
                                f"({', '.join([*POLICY_FIELDS, 'explore', 'in_batch_load'])})")
        rec = {"set": fields}
        ref = get_string(body, "reference", default=None, max_len=128)
        if given == ["budget"]:
            text = get_string(body, "budget", default=..., max_len=32)
            try:
                b = Budget.parse(text, ref)
            except ValueError:
                raise ApiError(422, f"field 'budget' must look like 25% or 0.25, got {text[:32]!r}",
                               param="budget") from None
            rec.update(kind=b.kind, value=b.value, reference=ref)
        elif given:
            k = given[0]
            rec.update(kind="usd" if k == "budget_usd" else "cost_weight", reference=ref,
                       value=get_number(body, k, default=..., lo=0, hi=1e6))
        return JSONResponse(await svc.routing.set_policy(rec))

    @endpoint("models_remove", "admin")
    async def models_remove(request):
        name = request.path_params["name"]
        await svc.models.remove_model(name)
        return JSONResponse({"removed": name})

    @endpoint("metrics", "admin")
    async def metrics(request):
        m.routing.queue.set(svc.routing.batcher.pending)
        return Response(m.render(), media_type=CONTENT_TYPE_LATEST)

    @endpoint("healthz", None, needs_started=False)
    async def healthz(request):
        """Liveness: answers anyone, whatever key it sends (an invalid one is no key here)."""
        try:
            key = auth.identify(request.headers.get("authorization"))
        except AuthError:
            key = None
        if (auth.enabled and key is None) or not svc.started:
            return JSONResponse({"status": "ok"})
        out = svc.health()
        if request.query_params.get("digest") in ("1", "true"):
            if auth.enabled and "admin" not in key.roles:
                raise AuthError(403, "the state digest needs the 'admin' role")
            out["state_digest"] = await svc.digest()
        return JSONResponse(out)

    @endpoint("readyz", None, needs_started=False)
    async def readyz(request):
        """Readiness: 200 once the state is restored and the journal replayed, else 503."""
        if not svc.started:
            return JSONResponse({"status": "stopping" if svc.ever_started else "starting"}, status_code=503,
                                headers={"Retry-After": "1"})
        j = svc.applier.journal
        return JSONResponse({"status": "ready", "journal_torn_tails": getattr(j, "torn_tails", 0)})

    @endpoint("chat", "route", json_body=True)
    async def chat(request):
        body = await body_of(request)
        if "messages" not in body:
            raise ApiError(422, "field 'messages' is required", param="messages")
        text = routing_text(body["messages"], cfg.gateway.route_on)
        if not text.strip():
            raise ApiError(422, "the messages hold no text to route on", param="messages")
        if len(text) > cfg.limits.max_prompt_chars:
            raise ApiError(413, f"the text routed on has {len(text)} characters, more than the limit of "
                                f"{cfg.limits.max_prompt_chars}", param="messages")
        stream = get_bool(body, "stream", False)
        pol = svc.gateway.request_policy(body, request.state.key)
        proxy = svc.gateway.proxy
        if proxy.inflight >= cfg.limits.max_inflight_proxy:
            m.routing.rejected.labels("proxy_busy").inc()
            raise ApiError(503, f"{proxy.inflight} proxied calls in flight, the limit; retry later",
                           "overloaded", headers={"Retry-After": "1"})
        mask = svc.gateway.chat_mask(pol.candidates)
        proxy.inflight += 1
        handed_off = False  # a streaming answer releases its slot and reservation when the stream ends
        hold = None  # the call's reservation against the key's budget (spend.py)
        key = request.state.key
        try:
            [res] = await svc.routing.route([text], point=pol.point, max_cost_usd=pol.max_cost_usd, allowed=mask,
                                            kind="chat", key=pol.key)
            hold = svc.gateway.reserve(key, res, body, pol)
            if hold is None:  # the budget left cannot cover this call: as when it is spent, the cheapest LLM
                [res] = await svc.routing.route([text], point=pol.point, max_cost_usd=0.0, allowed=mask,
                                                kind="chat", key=pol.key)
                hold = svc.gateway.reserve(key, res, body, pol, force=True)
            resp = await svc.gateway.chat_with_fallbacks(body, res, stream, pol.pinned is not None, key, hold)
            handed_off = isinstance(resp, StreamingResponse)
            return resp
        finally:
            if not handed_off:
                proxy.inflight -= 1
                svc.spend.release(hold)

    async def not_found(request, exc):
        if isinstance(exc, HTTPException):
            path = request.url.path[:200]
            msg = {404: f"no endpoint {path}", 405: f"method {request.method[:20]} not allowed on "
                   f"{path}"}.get(exc.status_code, "bad request")
            return error_response(exc.status_code, msg, "not_found" if exc.status_code == 404 else
                                  "invalid_request_error", headers=getattr(exc, "headers", None))
        return error_response(500, "internal error", "server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            await svc.start()
        except Exception as e:
            app.state.start_error = e
            log.error("the router could not start: %s", e)
            raise
        gc.collect()
        gc.freeze()  # the loaded router, JAX and the libraries: never scanned by the cyclic GC again
        try:
            yield
        finally:
            await svc.stop()

    app = Starlette(routes=[
        Route("/v1/route", route, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
        Route("/v1/models", models_list, methods=["GET"]),
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/v1/models", models_add, methods=["POST"]),
        Route("/v1/models/{name:path}", models_remove, methods=["DELETE"]),
        Route("/v1/models/{name:path}", models_reprice, methods=["PATCH"]),
        Route("/v1/policy", policy_get, methods=["GET"]),
        Route("/v1/policy", policy_set, methods=["PUT"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.service = svc
    app.state.auth = auth
    return app


class _QuietStartup(logging.Filter):
    """Keeps uvicorn's copy of a startup traceback out of the log: the CLI prints one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Traceback") or msg == "Application startup failed. Exiting.")


def run(cfg: ServeConfig, debug: bool = False) -> None:
    """Run the router service on uvicorn until SIGINT/SIGTERM (which checkpoint before exiting).
    A service that cannot start raises ServeStartupError naming why."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(cfg)
    if cfg.http.api_keys is None:
        if cfg.http.insecure:
            log.warning("serving on %s without API keys (--insecure): anyone who reaches it may call every "
                        "endpoint", cfg.http.host)
        else:
            log.info("no --api-keys: every endpoint is open to whoever reaches %s (loopback)", cfg.http.host)
    protocol = type("GuardedHttp", (GuardedHttpProtocol,), {
        "header_timeout_s": cfg.http.header_timeout_s, "body_timeout_s": cfg.http.body_timeout_s,
        "max_connections": cfg.http.max_connections, "max_per_client": cfg.http.max_connections_per_ip})
    config = uvicorn.Config(app, host=cfg.http.host, port=cfg.http.port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=30, backlog=2048, timeout_keep_alive=30,
                            http=protocol, limit_concurrency=cfg.http.max_connections)
    server = uvicorn.Server(config)
    quiet = _QuietStartup()
    if not debug:
        logging.getLogger("uvicorn.error").addFilter(quiet)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises SIGTERM after its graceful shutdown (final checkpoint included), with the
        # handler found at start: make that handler a clean exit, so a graceful stop exits 0.
        signal.signal(signal.SIGTERM, _graceful_exit)
    svc = app.state.service
    # every request allocates ~100 short-lived containers (its JSON, the explanation): collect the
    # young generation every GC_YOUNG allocations rather than Python's 700, and older ones more rarely
    gc.set_threshold(GC_YOUNG, 20, 20)
    try:
        server.run()
    except SystemExit:
        if svc.ever_started:  # uvicorn exits (3) when the lifespan startup failed: reported below
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    if not svc.ever_started:
        err = getattr(app.state, "start_error", None)
        if err is not None and debug:
            raise err
        raise ServeStartupError(f"the router could not start: {err}" if err is not None
                                else "the router could not start (see the log above)")


def _graceful_exit(signum, frame):
    raise SystemExit(0)


def main(argv=None) -> None:
    """`python -m mixllm_jax.serve`: the options of `mixllm-jax serve`; an error is one line on
    stderr and exit status 2 (--debug: the traceback)."""
    from mixllm_jax.util.command import run_command

    p = argparse.ArgumentParser(prog="python -m mixllm_jax.serve", description=__doc__.split("\n")[0])
    add_serve_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    run_command(lambda: run(config_from_args(args), debug=args.debug), debug=args.debug, prog=p.prog)

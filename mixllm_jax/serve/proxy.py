"""The proxy: a routed chat request forwarded to its LLM's backend, and the SSE relay.

`Proxy.proxy` forwards a routed chat request to the chosen LLM's backend (backends.Backend) and
answers with its reply (JSON) or relays its event stream (SSE) as it comes, recording usage, cost
and latency (spend.Spend); a failing backend raises BackendFailure (502/504), which gateway.py may
answer with a fallback. A failure is an availability signal (the LLM's failure rate, live.FailureRates,
and gateway.py's cooldown), never a quality observation: only POST /v1/feedback teaches quality.
The call's reservation (spend.Hold) is settled by its usage record; a stream that ends early (the
client disconnects, the backend fails) is billed for the content it relayed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from mixllm_jax.serve.backends import Backend
from mixllm_jax.serve.http import ApiError, loads_checked

GATEWAY_FIELDS = ("cost_weight", "max_cost_usd", "allowed_models", "blocked_models")  # not forwarded

log = logging.getLogger(__name__)


def loads_backend_json(raw: bytes) -> Any:
    """A backend's JSON answer, parsed with the request parser's bounds (ValueError otherwise), so
    nothing a backend sends can make us fail to answer (deep nesting, NaN, lone surrogates)."""
    return loads_checked(raw.decode("utf-8"))


class BackendFailure(ApiError):
    """A backend failed before any byte of its answer was sent to the client (a fallback may follow)."""


def _sse_stats(line: bytes) -> tuple[dict | None, int]:
    """One SSE line -> (its "usage" object or None, 1 if it carries a content delta else 0)."""
    if not line.startswith(b"data:"):
        return None, 0
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None, 0
    try:
        obj = loads_backend_json(data)
    except ValueError:
        return None, 0
    if not isinstance(obj, dict):
        return None, 0
    usage = obj["usage"] if isinstance(obj.get("usage"), dict) else None
    deltas = 0
    for c in obj.get("choices") or []:
        if isinstance(c, dict) and (c.get("delta") or {}).get("content"):
            deltas += 1
    return usage, deltas


class Proxy:
    """Calls the LLMs' backends. http: the httpx.AsyncClient (made by `open`, closed by `close`);
    inflight: proxied calls in flight (the chat endpoint holds one per call; --max-inflight-proxy);
    features: journal.FeatureStore; spend: spend.Spend (reservations, usage and cost; its live
    state holds the failure rates); metrics: prometheus.Metrics."""

    def __init__(self, *, features, spend, metrics):
        self.features, self.spend, self.metrics = features, spend, metrics
        self.http: httpx.AsyncClient | None = None
        self.inflight = 0

    def open(self, max_connections: int) -> None:
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=max_connections,
                                                          max_keepalive_connections=64),
                                      timeout=60.0, trust_env=False, follow_redirects=False)

    async def close(self) -> None:
        await self.http.aclose()

    def observe(self, model: str, failed: bool) -> None:
        """Count one backend call that ended (answered, or failed) in the LLM's failure rate."""
        rate = self.spend.live.failures.observe(model, failed)
        self.metrics.backends.failure_rate.labels(model).set(rate)

    def backend_failed(self, rid: str, model: str, reason: str, message: str, status: int) -> ApiError:
        """Count a failed backend call (its LLM's failure rate; no quality is recorded) and return the error."""
        self.metrics.backends.failures.labels(model, reason).inc()
        self.observe(model, True)
        return BackendFailure(status, message, "backend_error",
                              headers={"x-mixllm-request-id": rid, "x-mixllm-model": model})

    async def proxy(self, body: dict, res: dict, stream: bool, failed_before: list, hold=None) -> Response:
        """Forward the chat request `body` to the backend of the LLM chosen in `res` (a route result);
        `failed_before`: the attempts that failed before this one (shown in the answer); `hold`: the
        call's reservation (spend.Hold), settled by its usage record. BackendFailure when the backend
        fails before the answer starts.

        The caller holds one of `inflight` and the reservation; a StreamingResponse releases both when
        the stream ends (or is collected unstarted), any other answer leaves them to the caller.
        """
        rid, model, key = res["request_id"], res["model"], res["_key"]
        backend: Backend | None = res.get("_backend")
        if backend is None:
            raise self.backend_failed(rid, model, "no_backend", f"model {model!r} has no backend configured", 502)
        payload = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
        payload["model"] = backend.model or model
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if backend.api_key_env:
            key = os.environ.get(backend.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
        url = backend.base_url + "/chat/completions"
        mh = {"x-mixllm-request-id": rid, "x-mixllm-model": model, "x-mixllm-attempts": str(len(failed_before) + 1)}
        content = json.dumps(payload).encode()

        def failed(reason: str, message: str, status: int, detail: str = "") -> ApiError:
            # the client learns what went wrong; the URL and the exception text go to the log only
            log.warning("backend of %r at %s: %s %s (request %s)", model, url, message, detail, rid)
            return self.backend_failed(rid, model, reason, f"backend of {model!r} {message}", status)

        timed_out = f"timed out after {backend.timeout_s:g} s"
        t0 = time.perf_counter()
        try:
            req = self.http.build_request("POST", url, content=content, headers=headers,
                                          timeout=httpx.Timeout(backend.timeout_s))
            resp = await self.http.send(req, stream=True)
        except httpx.TimeoutException:
            raise failed("timeout", timed_out, 504) from None
        except httpx.HTTPError as e:
            raise failed("connect", "could not be reached", 502, f"{type(e).__name__}: {e}") from None
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        if not stream or resp.status_code != 200 or not sse:  # a whole answer (JSON), even if asked to stream
            try:
                raw = await resp.aread()
            except httpx.TimeoutException:
                await resp.aclose()
                raise failed("timeout", timed_out, 504) from None
            except httpx.HTTPError as e:
                await resp.aclose()
                raise failed("read", "failed mid-answer", 502, f"{type(e).__name__}: {e}") from None
            await resp.aclose()
            latency = time.perf_counter() - t0
            if resp.status_code >= 500:
                raise failed(f"http_{resp.status_code}", f"answered HTTP {resp.status_code}", 502,
                             raw[:300].decode("utf-8", "replace"))
            if resp.status_code >= 400:  # the request's fault, not the LLM's: passed through as is
                self.observe(model, False)
                return Response(raw, status_code=resp.status_code, headers=mh,
                                media_type=resp.headers.get("content-type", "application/json"))
            try:
                data = loads_backend_json(raw)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:  # UnicodeDecodeError too
                raise failed("bad_json", "answered invalid JSON", 502, str(e)[:200]) from None
            self.observe(model, False)
            self.spend.record_usage(rid, model, key, data.get("usage"), latency, None, hold=hold)
            data["mixllm"] = {"request_id": rid, "model": model,
                              "fallbacks": [{"model": f["model"], "error": f["error"]} for f in failed_before]}
            return JSONResponse(data, headers=mh)

        released = False

        def release():  # once: when the stream ends, or when a stream never started is collected
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1
                self.spend.release(hold)

        self.observe(model, False)  # the stream started (a failure mid-stream counts as one more call)
        gen = self._relay(resp, rid, model, key, t0, failed, release, hold)
        weakref.finalize(gen, release)
        return StreamingResponse(gen, status_code=200, headers=mh,
                                 media_type=resp.headers.get("content-type", "text/event-stream"))

    async def _relay(self, resp: httpx.Response, rid: str, model: str, key: str, t0: float, failed, release, hold):
        """Pass the backend's event stream through chunk by chunk, noting the time to first byte, the
        last "usage" object and the content deltas relayed (counted once the client took their
        chunk: the token count when no usage comes); a failure mid-stream ends it with an SSE error
        event. Usage is recorded however the stream ends: complete, failed mid-stream, or cut by the
        client (GeneratorExit or CancelledError here), the last two billed for the deltas relayed."""
        ttft = None
        buf = b""
        usage = None
        deltas = 0
        aborted = "client"  # until the stream completes or the backend fails
        try:
            async for chunk in resp.aiter_raw():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                buf += chunk
                *lines, buf = buf.split(b"\n")
                n = 0
                for line in lines:
                    u, d = _sse_stats(line)
                    if u is not None:
                        usage = u
                    n += d
                yield chunk
                deltas += n  # the client took the chunk
            aborted = None
        except httpx.HTTPError as e:
            aborted = "backend"
            reason = "timeout" if isinstance(e, httpx.TimeoutException) else "read"
            err = failed(reason, "failed mid-stream", 502, f"{type(e).__name__}: {e}")
            yield ("data: " + json.dumps({"error": {"message": err.message, "type": err.type}}) + "\n\n").encode()
        finally:
            try:
                self.spend.record_usage(rid, model, key, usage, time.perf_counter() - t0, ttft, approx_tokens=deltas,
                                        hold=hold, aborted=aborted)
            finally:
                release()
                await resp.aclose()

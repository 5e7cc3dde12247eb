"""LLM backends: their configuration (backends.yaml, POST /v1/models), the proxy and its SSE relay.

A backend is an OpenAI-compatible endpoint. `proxy` forwards a routed chat request to the chosen
LLM's backend and answers with its reply (JSON) or relays its event stream (SSE) as it comes,
recording usage and latency; a failing backend is answered 502/504 and recorded as quality 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml
from starlette.responses import JSONResponse, Response, StreamingResponse

from mixllm_jax.serve.http import ApiError, is_num

if TYPE_CHECKING:
    from mixllm_jax.serve.service import RouterService

BACKEND_KEYS = ("base_url", "model", "api_key_env", "timeout_s")


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
    """A Backend from ``{base_url, model?, api_key_env?, timeout_s?}``; ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a mapping with base_url, got {obj!r:.80}")
    unknown = sorted(set(obj) - set(BACKEND_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(BACKEND_KEYS)})")
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
    if not is_num(timeout) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{where}.timeout_s must be a positive number of seconds, got {timeout!r}")
    return Backend(url.rstrip("/"), model, key_env, float(timeout))


def load_backends(path: str | Path | None) -> dict[str, Backend]:
    """backends.yaml: ``{backends: {llm name: {base_url, model?, api_key_env?, timeout_s?}}}``
    (the top-level ``backends:`` key may be left out)."""
    if path is None:
        return {}
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


def read_live_backends(path: Path) -> dict[str, Backend]:
    """The backends of LLMs added live (live_models.json, written at each checkpoint)."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        return {n: parse_backend(b, f"{path}: {n!r}") for n, b in doc.items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is damaged ({e}); fix or delete it") from e


# ---------------------------------------------------------------------------------------------
# The proxy


async def backend_failed(svc: RouterService, rid: str, model: str, reason: str, message: str,
                         status: int) -> ApiError:
    """Count a failed backend call, record quality 0 for the request (once), and return the error."""
    svc.metrics.backend_fail.labels(model, reason).inc()
    e = svc.features.get(rid)
    note = ""
    if e is not None and not e.has_quality and svc.entry_live(e):
        await svc.record_quality(rid, e, 0.0, "backend_failure")
        note = f"; recorded as quality 0 for {model!r}"
    return ApiError(status, message + note, "backend_error",
                    headers={"x-mixllm-request-id": rid, "x-mixllm-model": model})


async def proxy(svc: RouterService, body: dict, res: dict, stream: bool) -> Response:
    """Forward the chat request `body` to the backend of the LLM chosen in `res` (a route result).

    The caller holds one of `svc.proxy_inflight`; a StreamingResponse releases it when the stream
    ends (or is collected unstarted), any other answer leaves it to the caller.
    """
    rid, model = res["request_id"], res["model"]
    backend: Backend | None = res.get("_backend")
    if backend is None:
        raise await backend_failed(svc, rid, model, "no_backend", f"model {model!r} has no backend configured", 502)
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

    async def failed(reason: str, message: str, status: int) -> ApiError:
        return await backend_failed(svc, rid, model, reason, f"backend of {model!r} ({url}) {message}", status)

    timed_out = f"timed out after {backend.timeout_s:g} s"
    t0 = time.perf_counter()
    try:
        req = svc.http.build_request("POST", url, content=content, headers=headers,
                                     timeout=httpx.Timeout(backend.timeout_s))
        resp = await svc.http.send(req, stream=True)
    except httpx.TimeoutException:
        raise await failed("timeout", timed_out, 504) from None
    except httpx.HTTPError as e:
        raise await failed("connect", f"failed: {type(e).__name__}: {e}", 502) from None
    sse = resp.headers.get("content-type", "").startswith("text/event-stream")
    if not stream or resp.status_code != 200 or not sse:  # a whole answer (JSON), even if asked to stream
        try:
            raw = await resp.aread()
        except httpx.TimeoutException:
            await resp.aclose()
            raise await failed("timeout", timed_out, 504) from None
        except httpx.HTTPError as e:
            await resp.aclose()
            raise await failed("read", f"failed mid-answer: {type(e).__name__}: {e}", 502) from None
        await resp.aclose()
        latency = time.perf_counter() - t0
        if resp.status_code >= 500:
            raise await failed(f"http_{resp.status_code}", f"answered HTTP {resp.status_code}: "
                                                           f"{raw[:300].decode('utf-8', 'replace')}", 502)
        if resp.status_code >= 400:  # the request's fault, not the LLM's: passed through as is
            return Response(raw, status_code=resp.status_code, headers=mh,
                            media_type=resp.headers.get("content-type", "application/json"))
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise await failed("bad_json", f"answered invalid JSON ({e})", 502) from None
        svc.record_usage(rid, model, data.get("usage"), latency, None)
        data["mixllm"] = {"request_id": rid, "model": model}
        return JSONResponse(data, headers=mh)

    released = False

    def release():  # once: when the stream ends, or when a stream never started is collected
        nonlocal released
        if not released:
            released = True
            svc.proxy_inflight -= 1

    gen = _relay(svc, resp, rid, model, t0, failed, release)
    weakref.finalize(gen, release)
    return StreamingResponse(gen, status_code=200, headers=mh,
                             media_type=resp.headers.get("content-type", "text/event-stream"))


def _sse_stats(line: bytes) -> tuple[dict | None, int]:
    """One SSE line -> (its "usage" object or None, 1 if it carries a content delta else 0)."""
    if not line.startswith(b"data:"):
        return None, 0
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None, 0
    try:
        obj = json.loads(data)
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


async def _relay(svc: RouterService, resp: httpx.Response, rid: str, model: str, t0: float, failed, release):
    """Pass the backend's event stream through chunk by chunk, noting the time to first byte, the
    last "usage" object and the content deltas (the token count when no usage comes); a failure
    mid-stream ends it with an SSE error event. Usage is recorded when the stream completes."""
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
                u, n = _sse_stats(line)
                if u is not None:
                    usage = u
                deltas += n
            yield chunk
        ok = True
    except httpx.HTTPError as e:
        reason = "timeout" if isinstance(e, httpx.TimeoutException) else "read"
        err = await failed(reason, f"failed mid-stream: {type(e).__name__}: {e}", 502)
        yield ("data: " + json.dumps({"error": {"message": err.message, "type": err.type}}) + "\n\n").encode()
    finally:
        release()
        await resp.aclose()
        if ok:
            svc.record_usage(rid, model, usage, time.perf_counter() - t0, ttft, approx_tokens=deltas)

"""LLM backends: their configuration (backends.yaml, POST /v1/models), the proxy and its SSE relay.

A backend is an OpenAI-compatible endpoint (and, optionally, its LLM's context window). `proxy`
forwards a routed chat request to the chosen LLM's backend and answers with its reply (JSON) or
relays its event stream (SSE) as it comes, recording usage, cost and latency; a failing backend
raises BackendFailure (502/504, recorded as quality 0), which gateway.py may answer with a fallback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import urllib.parse
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml
from starlette.responses import JSONResponse, Response, StreamingResponse

from mixllm_jax.serve.cluster import ClusterUnavailable
from mixllm_jax.serve.http import ApiError, is_num, loads_checked
from mixllm_jax.serve.spend import record_usage

if TYPE_CHECKING:
    from mixllm_jax.serve.service import RouterService

BACKEND_KEYS = ("base_url", "model", "api_key_env", "timeout_s", "context_window")
REQUEST_BACKEND_KEYS = ("base_url", "model", "timeout_s", "context_window")  # what POST /v1/models may set
GATEWAY_FIELDS = ("cost_weight", "max_cost_usd", "allowed_models", "blocked_models")  # not forwarded
MAX_CONTEXT = 100_000_000
MAX_TIMEOUT_S = 600.0
MAX_URL = 500

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Backend:
    """An OpenAI-compatible endpoint serving one LLM."""

    base_url: str
    model: str | None = None  # the model name at the backend (default: the LLM's name)
    api_key_env: str | None = None  # environment variable holding the API key (operator's files only)
    timeout_s: float = 60.0
    context_window: int | None = None  # tokens the LLM takes (prompt + answer); None: unknown

    def record(self) -> dict:
        """What the journal and live_models.json keep of a live LLM's backend: never a key's variable
        (that comes from the operator's allow-list each time the backend is resolved)."""
        return {"base_url": self.base_url, "model": self.model, "timeout_s": self.timeout_s,
                "context_window": self.context_window}

    def public(self) -> dict:
        """What clients see (GET /v1/models): no URL, no key variable."""
        return {"model": self.model, "timeout_s": self.timeout_s}


@dataclasses.dataclass(frozen=True)
class AllowedHost:
    """An allow-list entry: a host name or IP (lower case), a port or None for any, the variable
    holding the API key sent to it (or None)."""

    host: str
    port: int | None = None
    api_key_env: str | None = None


@dataclasses.dataclass
class BackendsFile:
    """The operator's backends file: per-LLM backends and the hosts live backends may use."""

    backends: dict[str, Backend] = dataclasses.field(default_factory=dict)
    allow_hosts: list[AllowedHost] = dataclasses.field(default_factory=list)

    def allowed(self, base_url: str) -> AllowedHost | None:
        """The allow-list entry `base_url` matches, or None."""
        try:
            u = urllib.parse.urlsplit(base_url)
            host, port = (u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            return None
        for a in self.allow_hosts:
            if a.host == host and (a.port is None or a.port == port):
                return a
        return None


def parse_backend(obj: Any, where: str) -> Backend:
    """A Backend from ``{base_url, model?, api_key_env?, timeout_s?}``; ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a mapping with base_url, got {type(obj).__name__}")
    unknown = sorted(map(str, set(obj) - set(BACKEND_KEYS)))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(BACKEND_KEYS)})")
    url = obj.get("base_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}.base_url must be an http(s) URL")
    check_url(url, where + ".base_url")
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 200
                              or not model.isprintable()):
        raise ValueError(f"{where}.model must be a printable string of 1-200 characters")
    key_env = obj.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env)):
        raise ValueError(f"{where}.api_key_env must be an environment variable name")
    timeout = obj.get("timeout_s", 60.0)
    if not is_num(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"{where}.timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    ctx = obj.get("context_window")
    if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or not 0 < ctx <= MAX_CONTEXT):
        raise ValueError(f"{where}.context_window must be an integer number of tokens in [1, {MAX_CONTEXT}]")
    return Backend(url.rstrip("/"), model, key_env, float(timeout), ctx)


def check_url(url: str, where: str) -> None:
    """ValueError unless `url` is a plain http(s) URL: a host, an optional port and a path; no
    user:password@, query, fragment, whitespace or control characters; at most MAX_URL characters."""
    if len(url) > MAX_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError(f"{where} must be a printable ASCII URL of at most {MAX_URL} characters")
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{where} is not a valid URL") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{where} must be an http(s) URL with a host")
    if u.username is not None or u.password is not None or "@" in u.netloc:
        raise ValueError(f"{where} must not hold a user name or password")
    if u.query or u.fragment:
        raise ValueError(f"{where} must not hold a query or fragment")


def _parse_allow(entry: Any, where: str) -> AllowedHost:
    if isinstance(entry, dict):
        unknown = sorted(map(str, set(entry) - {"host", "api_key_env"}))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: host, api_key_env)")
        key_env = entry.get("api_key_env")
        if key_env is not None and (not isinstance(key_env, str)
                                    or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env)):
            raise ValueError(f"{where}.api_key_env must be an environment variable name")
        entry = entry.get("host")
    else:
        key_env = None
    if not isinstance(entry, str) or not entry or "/" in entry or "@" in entry:
        raise ValueError(f"{where} must be a host name or IP, optionally with :port (e.g. 127.0.0.1:9001)")
    try:
        u = urllib.parse.urlsplit("//" + entry)
        host, port = u.hostname, u.port
    except ValueError:
        raise ValueError(f"{where}: {entry!r} is not a host[:port]") from None
    if not host:
        raise ValueError(f"{where}: {entry!r} is not a host[:port]")
    return AllowedHost(host.lower(), port, key_env)


def load_backends_file(path: str | Path | None) -> BackendsFile:
    """backends.yaml::

        backends:                 # LLM name -> its backend (the top-level key may be left out)
          gpt-4: {base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}
        allow_hosts:              # hosts POST /v1/models may point a live LLM's backend at
          - 127.0.0.1:9001
          - {host: api.openai.com, api_key_env: OPENAI_API_KEY}

    ValueError (or FileNotFoundError) naming the file and the entry at fault."""
    if path is None:
        return BackendsFile()
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"backends file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0][:160] if str(e) else 'too deep'})") from None
    if doc is None:
        return BackendsFile()
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of LLM name -> backend, got {type(doc).__name__}")
    allow = doc.get("allow_hosts") if ("backends" in doc or "allow_hosts" in doc) else None
    if "backends" in doc or "allow_hosts" in doc:
        unknown = sorted(map(str, set(doc) - {"backends", "allow_hosts"}))
        if unknown:
            raise ValueError(f"{path}: unknown top-level key(s) {unknown} (known: backends, allow_hosts)")
        doc = doc.get("backends") or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: backends must be a mapping of LLM name -> backend, got {type(doc).__name__}")
    if allow is not None and not isinstance(allow, list):
        raise ValueError(f"{path}: allow_hosts must be a list of host[:port] entries")
    return BackendsFile(
        backends={str(name): parse_backend(spec, f"{path}: backends[{str(name)[:80]!r}]") for name, spec in doc.items()},
        allow_hosts=[_parse_allow(e, f"{path}: allow_hosts[{i}]") for i, e in enumerate(allow or [])])


def load_backends(path: str | Path | None) -> dict[str, Backend]:
    """The per-LLM backends of a backends file (see `load_backends_file`)."""
    return load_backends_file(path).backends


def request_backend(obj: Any, allow: BackendsFile) -> Backend:
    """The backend a POST /v1/models body asks for, checked against the operator's allow-list:
    ApiError 422 for a malformed one, 403 for a host not on the list or an ``api_key_env`` (a key's
    variable is never taken from a request: it would let a client send any secret of the server's
    environment to a host of its choice). The key sent is the allow-list entry's."""
    if not isinstance(obj, dict):
        raise ApiError(422, "field 'backend' must be an object with base_url (and model, timeout_s)", param="backend")
    if "api_key_env" in obj:
        raise ApiError(403, "field 'backend.api_key_env' is not accepted in a request: the API key of a "
                            "backend comes from the operator's backends file (allow_hosts)", "permission_error",
                       param="backend.api_key_env")
    unknown = sorted(map(str, set(obj) - set(REQUEST_BACKEND_KEYS)))
    if unknown:
        raise ApiError(422, f"unknown key(s) {[u[:40] for u in unknown[:5]]} in 'backend' (known: "
                            f"{', '.join(REQUEST_BACKEND_KEYS)})", param="backend")
    try:
        b = parse_backend(obj, "backend")
    except ValueError as e:
        raise ApiError(422, str(e), param="backend") from None
    entry = allow.allowed(b.base_url)
    if entry is None:
        raise ApiError(403, "backend.base_url points at a host that is not on the operator's allow-list "
                            "(allow_hosts in the backends file)", "permission_error", param="backend.base_url")
    return dataclasses.replace(b, api_key_env=entry.api_key_env)


def resolve_live_backend(rec: Any, allow: BackendsFile, where: str) -> Backend | None:
    """A live LLM's backend from its journal or live_models.json record, re-checked against today's
    allow-list (None, logged, when it no longer passes: the LLM stays, without a backend)."""
    try:
        b = parse_backend({k: v for k, v in rec.items() if k != "api_key_env"}, where)
    except (ValueError, AttributeError) as e:
        log.warning("%s: backend dropped (%s)", where, e)
        return None
    entry = allow.allowed(b.base_url)
    if entry is None:
        log.warning("%s: backend dropped: its host is not on the backends file's allow_hosts", where)
        return None
    return dataclasses.replace(b, api_key_env=entry.api_key_env)


def read_live_backends(path: Path) -> dict[str, dict]:
    """The backend records of LLMs added live (live_models.json, written at each checkpoint)."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
            raise ValueError("not a mapping of name -> backend")
        return doc
    except (ValueError, OSError, RecursionError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}); fix or delete it") from None


def loads_backend_json(raw: bytes) -> Any:
    """A backend's JSON answer, parsed with the request parser's bounds (ValueError otherwise), so
    nothing a backend sends can make us fail to answer (deep nesting, NaN, lone surrogates)."""
    return loads_checked(raw.decode("utf-8"))


# ---------------------------------------------------------------------------------------------
# The proxy


class BackendFailure(ApiError):
    """A backend failed before any byte of its answer was sent to the client (a fallback may follow)."""


async def backend_failed(svc: RouterService, rid: str, model: str, reason: str, message: str,
                         status: int) -> ApiError:
    """Count a failed backend call, record quality 0 for the request (once), and return the error."""
    svc.metrics.backend_fail.labels(model, reason).inc()
    e = svc.features.get(rid)
    note = ""
    if e is not None and not e.has_quality and svc.entry_live(e):
        try:
            await svc.record_quality(rid, e, 0.0, "backend_failure")
            note = f"; recorded as quality 0 for {model!r}"
        except (ApiError, ClusterUnavailable) as err:  # --cluster: judged on another replica, or NATS is down
            log.warning("quality 0 for %s not recorded: %s", rid, err)
    return BackendFailure(status, message + note, "backend_error",
                          headers={"x-mixllm-request-id": rid, "x-mixllm-model": model})


async def proxy(svc: RouterService, body: dict, res: dict, stream: bool, failed_before: list) -> Response:
    """Forward the chat request `body` to the backend of the LLM chosen in `res` (a route result);
    `failed_before`: the attempts that failed before this one (shown in the answer). BackendFailure
    when the backend fails before the answer starts.

    The caller holds one of `svc.proxy_inflight`; a StreamingResponse releases it when the stream
    ends (or is collected unstarted), any other answer leaves it to the caller.
    """
    rid, model, key = res["request_id"], res["model"], res["_key"]
    backend: Backend | None = res.get("_backend")
    if backend is None:
        raise await backend_failed(svc, rid, model, "no_backend", f"model {model!r} has no backend configured", 502)
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

    async def failed(reason: str, message: str, status: int, detail: str = "") -> ApiError:
        # the client learns what went wrong; the URL and the exception text go to the log only
        log.warning("backend of %r at %s: %s %s (request %s)", model, url, message, detail, rid)
        return await backend_failed(svc, rid, model, reason, f"backend of {model!r} {message}", status)

    timed_out = f"timed out after {backend.timeout_s:g} s"
    t0 = time.perf_counter()
    try:
        req = svc.http.build_request("POST", url, content=content, headers=headers,
                                     timeout=httpx.Timeout(backend.timeout_s))
        resp = await svc.http.send(req, stream=True)
    except httpx.TimeoutException:
        raise await failed("timeout", timed_out, 504) from None
    except httpx.HTTPError as e:
        raise await failed("connect", "could not be reached", 502, f"{type(e).__name__}: {e}") from None
    sse = resp.headers.get("content-type", "").startswith("text/event-stream")
    if not stream or resp.status_code != 200 or not sse:  # a whole answer (JSON), even if asked to stream
        try:
            raw = await resp.aread()
        except httpx.TimeoutException:
            await resp.aclose()
            raise await failed("timeout", timed_out, 504) from None
        except httpx.HTTPError as e:
            await resp.aclose()
            raise await failed("read", "failed mid-answer", 502, f"{type(e).__name__}: {e}") from None
        await resp.aclose()
        latency = time.perf_counter() - t0
        if resp.status_code >= 500:
            raise await failed(f"http_{resp.status_code}", f"answered HTTP {resp.status_code}", 502,
                               raw[:300].decode("utf-8", "replace"))
        if resp.status_code >= 400:  # the request's fault, not the LLM's: passed through as is
            return Response(raw, status_code=resp.status_code, headers=mh,
                            media_type=resp.headers.get("content-type", "application/json"))
        try:
            data = loads_backend_json(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # UnicodeDecodeError too
            raise await failed("bad_json", "answered invalid JSON", 502, str(e)[:200]) from None
        record_usage(svc, rid, model, key, data.get("usage"), latency, None)
        data["mixllm"] = {"request_id": rid, "model": model,
                          "fallbacks": [{"model": f["model"], "error": f["error"]} for f in failed_before]}
        return JSONResponse(data, headers=mh)

    released = False

    def release():  # once: when the stream ends, or when a stream never started is collected
        nonlocal released
        if not released:
            released = True
            svc.proxy_inflight -= 1

    gen = _relay(svc, resp, rid, model, key, t0, failed, release)
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


async def _relay(svc: RouterService, resp: httpx.Response, rid: str, model: str, key: str, t0: float, failed,
                 release):
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
        err = await failed(reason, "failed mid-stream", 502, f"{type(e).__name__}: {e}")
        yield ("data: " + json.dumps({"error": {"message": err.message, "type": err.type}}) + "\n\n").encode()
    finally:
        release()
        await resp.aclose()
        if ok:
            record_usage(svc, rid, model, key, usage, time.perf_counter() - t0, ttft, approx_tokens=deltas)

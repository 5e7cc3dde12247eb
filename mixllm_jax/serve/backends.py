"""LLM backends: their configuration (backends.yaml, POST /v1/models, live_models.json).

A backend is an OpenAI-compatible endpoint (and, optionally, its LLM's context window); the proxy
that calls it is proxy.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from mixllm_jax.serve.http import ApiError, is_num

BACKEND_KEYS = ("base_url", "model", "api_key_env", "timeout_s", "context_window")
REQUEST_BACKEND_KEYS = ("base_url", "model", "timeout_s", "context_window")  # what POST /v1/models may set
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

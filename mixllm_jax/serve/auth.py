"""API keys: who may call which endpoint (`serve --api-keys FILE`).

The keys file (JSON or YAML) lists the SHA-256 of each key, never the key itself::

    keys:
      - name: web-frontend                      # shown in logs, never a secret
        sha256: 3b1c...e9                       # 64 hex digits (an optional "sha256:" prefix is fine)
        roles: [route, feedback]
      - name: ops
        sha256: 7d2a...41
        roles: [admin]
      - name: team-a
        sha256: 9f00...2c
        roles: [route, feedback]
        budget:                                 # optional, USD (serve/spend.py)
          usd_per_day: 5                        # UTC days
          usd_per_month: 100                    # UTC calendar months
          max_cost_usd: 0.05                    # per request (the router's cost cap)
          when_exhausted: cheapest              # or "reject": HTTP 429

Roles: ``route`` (POST /v1/route, POST /v1/chat/completions, GET /v1/models, GET /v1/usage), ``feedback``
(POST /v1/feedback), ``admin`` (POST /v1/models, DELETE /v1/models/{name}, GET /metrics; admin
may call everything). A client sends ``Authorization: Bearer <key>``; a missing or unknown key is
a 401, a key without the endpoint's role a 403, both with OpenAI-style error bodies. ``GET
/healthz`` answers anyone with ``{"status": "ok"}`` and a caller with a valid key with the details.

Hash a key with ``mixllm-jax hash-key`` (reads it from stdin; ``--generate`` makes a new one), or
``python -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.readline().strip().encode()).hexdigest())"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import re
import secrets
from pathlib import Path

ROLES = ("route", "feedback", "admin")
WHEN_EXHAUSTED = ("cheapest", "reject")
BUDGET_KEYS = ("usd_per_day", "usd_per_month", "max_cost_usd", "when_exhausted")
MAX_BUDGET_USD = 1e9
_HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_PREFIX = "mxk_"


class AuthError(Exception):
    """401 (no or unknown key) or 403 (the key lacks the role)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass(frozen=True)
class KeyBudget:
    """A key's spend limits in USD (None: no limit) and what happens once a period's is spent:
    "cheapest" routes to the cheapest eligible LLM, "reject" answers 429."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None
    max_cost_usd: float | None = None
    when_exhausted: str = "cheapest"


@dataclasses.dataclass(frozen=True)
class ApiKey:
    name: str
    roles: frozenset
    budget: KeyBudget | None = None


def parse_budget(obj, where: str) -> KeyBudget:
    """A KeyBudget from a keys file entry's ``budget`` mapping; ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a mapping of {', '.join(BUDGET_KEYS)}")
    unknown = sorted(set(map(str, obj)) - set(BUDGET_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(BUDGET_KEYS)})")
    vals = {}
    for k in BUDGET_KEYS[:3]:
        v = obj.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= MAX_BUDGET_USD):
            raise ValueError(f"{where}.{k} must be a number of USD in [0, {MAX_BUDGET_USD:g}]")
        vals[k] = None if v is None else float(v)
    when = obj.get("when_exhausted", "cheapest")
    if when not in WHEN_EXHAUSTED:
        raise ValueError(f"{where}.when_exhausted must be one of {', '.join(WHEN_EXHAUSTED)}")
    return KeyBudget(**vals, when_exhausted=when)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key as the keys file stores it."""
    return hashlib.sha256(key.strip().encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_keys(path: str | Path) -> dict[str, ApiKey]:
    """The keys file -> {sha256 hex: ApiKey}; ValueError naming the file and the entry at fault."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"API keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"API keys file {path} cannot be read ({type(e).__name__})") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected {{keys: [{{name, sha256, roles}}, ...]}} with at least one key")
    out: dict[str, ApiKey] = {}
    names = set()
    for i, e in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be a mapping with name, sha256 and roles")
        unknown = sorted(set(map(str, e)) - {"name", "sha256", "roles", "budget"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: name, sha256, roles, budget)")
        name = e.get("name")
        if not isinstance(name, str) or not name or len(name) > 100 or not name.isprintable():
            raise ValueError(f"{where}.name must be a printable string of 1-100 characters")
        if name in names:
            raise ValueError(f"{where}: duplicate name {name!r}")
        names.add(name)
        digest = e.get("sha256")
        if isinstance(digest, str) and digest.lower().startswith("sha256:"):
            digest = digest[7:]
        digest = digest.lower() if isinstance(digest, str) else digest
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"{where} ({name}).sha256 must be 64 hex digits (the SHA-256 of the key: "
                             f"mixllm-jax hash-key), not the key itself")
        if digest in out:
            raise ValueError(f"{where} ({name}): the same key as {out[digest].name!r}")
        roles = e.get("roles")
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            raise ValueError(f"{where} ({name}).roles must be a non-empty list of {', '.join(ROLES)}")
        budget = None if e.get("budget") is None else parse_budget(e["budget"], f"{where} ({name}).budget")
        out[digest] = ApiKey(name, frozenset(roles), budget)
    return out


class Authenticator:
    """Checks a request's bearer key against the keys file (or lets everything through when there
    is none: loopback-only or --insecure)."""

    def __init__(self, keys: dict[str, ApiKey] | None):
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key of an ``Authorization: Bearer`` header; None when there is no header; AuthError
        (401) for a malformed header or an unknown key."""
        if not self.enabled:
            return None
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise AuthError(401, "malformed Authorization header: expected 'Authorization: Bearer <API key>'")
        key = self.keys.get(hash_key(token))
        if key is None:
            raise AuthError(401, "invalid API key")
        return key

    def check(self, authorization: str | None, role: str) -> ApiKey | None:
        """The caller's key when it has `role` (or admin); AuthError 401/403 otherwise."""
        if not self.enabled:
            return None
        key = self.identify(authorization)
        if key is None:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <API key>'")
        if role not in key.roles and "admin" not in key.roles:
            raise AuthError(403, f"this API key lacks the {role!r} role this endpoint needs")
        return key


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on the loopback interface only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

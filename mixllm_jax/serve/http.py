"""Errors and request parsing: ApiError, OpenAI-style error bodies, JSON bodies, request fields.

Every helper raises `ApiError` with a message naming the field at fault; the app answers it as
``{"error": {"message", "type", "param", "code"}}`` with the error's status. Bodies are parsed with
bounds (depth, integer length, finite numbers, no lone surrogates) so no body can make the parser
or a later float32 conversion fail: a malformed body is a 400, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import orjson
from starlette.responses import JSONResponse

MAX_NAME = 200
MAX_JSON_DEPTH = 64  # arrays/objects nested deeper are refused (400)
MAX_INT_DIGITS = 40  # integer literals longer than this are refused (400): no number field needs them
F32_MAX = 3.4028234663852886e38  # the largest finite float32: state arrays are float32
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}", re.ASCII)
MODEL_NAME_RULE = ("1-128 characters: ASCII letters, digits and . _ : / @ + - (starting with a letter or "
                   "digit)")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class ApiError(Exception):
    """An error answered to the client: HTTP status, message naming the problem, OpenAI-style type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers
        self.code = code


class FastJSONResponse(JSONResponse):
    """A JSONResponse encoded by orjson (~20x faster than json on the ~100 floats of a route answer's
    explanation). For content that is JSON as it is: str keys, finite floats (non-finite numbers
    are None already), ints within 64 bits."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def error_response(status: int, message: str, type: str, param=None, headers=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _reject_constant(c):
    raise ValueError(f"{c} is not allowed in JSON (numbers must be finite)")


def _bounded_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(s)


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"the number {s[:40]} is out of range (numbers must be finite)")
    return v


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_bounded_int, parse_float=_finite_float)


def _depth(obj: Any, limit: int) -> bool:
    """True when arrays/objects in `obj` nest more than `limit` deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        kids = o.values() if isinstance(o, dict) else o
        stack.extend((k, d + 1) for k in kids if isinstance(k, (dict, list)))
    return False


def loads_checked(text: str) -> Any:
    """JSON text -> object, or ValueError naming the problem: malformed JSON, NaN/Infinity, numbers
    that overflow, integers longer than MAX_INT_DIGITS digits, nesting deeper than MAX_JSON_DEPTH,
    lone UTF-16 surrogates (\\ud800 escapes with no pair: not Unicode text). Never RecursionError."""
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(obj, (dict, list)) and _depth(obj, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):  # only escapes can make lone surrogates: check the decoded text
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone UTF-16 surrogate escape (e.g. \\ud800), "
                             "which is not Unicode text") from None
    return obj


def parse_json(body: bytes, limit: int) -> Any:
    """A JSON document of at most `limit` bytes, UTF-8, checked by `loads_checked` (400 otherwise)."""
    if len(body) > limit:
        raise ApiError(413, f"request body of {len(body)} bytes exceeds the limit of {limit} bytes")
    if not body.strip():
        raise ApiError(400, "empty request body: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return loads_checked(text)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None


def require_json(request) -> None:
    """415 unless the request says its body is JSON (Content-Type: application/json): a form or
    text/plain post, which a web page can send cross-site without a CORS preflight, is refused."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, "Content-Type must be application/json" + (f", got {ctype[:60]!r}" if ctype else ""),
                       param="content-type")


async def read_json_object(request, limit: int, timeout_s: float | None = None) -> dict:
    """The request's body as a JSON object, read in chunks and refused past `limit` bytes (413) or
    when it has not all arrived within `timeout_s` seconds (408, and the connection is closed)."""
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise ApiError(413, f"request body of {cl[:20]} bytes exceeds the limit of {limit} bytes")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                               headers={"Connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        if not timeout_s:
            body = await read()
        elif hasattr(asyncio, "timeout"):  # Python 3.11+: a deadline on this task, no task of its own
            async with asyncio.timeout(timeout_s):
                body = await read()
        else:
            body = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", "timeout",
                       headers={"Connection": "close"}) from None
    obj = parse_json(body, limit)
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def is_num(v) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _absent(obj: dict, key: str, default, name: str) -> bool:
    """True when the field is missing or null and has a default (``...`` = required: a 422)."""
    if key in obj and obj[key] is not None:
        return False
    if default is ...:
        raise ApiError(422, f"field {name!r} is required", param=name)
    return True


def show(v) -> str:
    """A client value, short, for an error message."""
    try:
        return json.dumps(v)[:60]
    except (TypeError, ValueError):
        return type(v).__name__


def get_number(obj: dict, key: str, *, lo: float, hi: float, default=None, lo_open=False,
               integer=False, where: str = "") -> Any:
    """A number field in [lo, hi] (lo excluded when `lo_open`), or the default when absent/null;
    a 422 naming the field otherwise. Every number has both bounds, within float32's range, so no
    accepted value overflows the float32 state (a huge int is refused, never converted)."""
    assert -F32_MAX <= lo <= hi <= F32_MAX
    name = where + key
    if _absent(obj, key, default, name):
        return default
    v = obj[key]
    if integer:
        if not (isinstance(v, int) and not isinstance(v, bool)):
            raise ApiError(422, f"field {name!r} must be an integer, got {show(v)}", param=name)
    elif not is_num(v):
        raise ApiError(422, f"field {name!r} must be a number, got {show(v)}", param=name)
    if isinstance(v, float) and not math.isfinite(v):
        raise ApiError(422, f"field {name!r} must be finite, got {v}", param=name)
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if (v <= lo if lo_open else v < lo) or v > hi:  # int/float comparisons are exact: no overflow
        raise ApiError(422, f"field {name!r} must be in {rng}, got {show(v)}", param=name)
    return v


def get_string(obj: dict, key: str, *, default=None, max_len: int = MAX_NAME, where: str = "") -> Any:
    """A non-empty string field of at most `max_len` characters (or the default), or a 422."""
    name = where + key
    if _absent(obj, key, default, name):
        return default
    v = obj[key]
    if not isinstance(v, str) or not v:
        raise ApiError(422, f"field {name!r} must be a non-empty string, got {show(v)}", param=name)
    if len(v) > max_len:
        raise ApiError(422, f"field {name!r} is {len(v)} characters long, more than {max_len}", param=name)
    return v


def get_model_name(obj: dict, key: str = "name") -> str:
    """A model name: MODEL_NAME_RULE (safe in URLs, logs, metric labels and JSON), or a 422."""
    v = get_string(obj, key, default=..., max_len=128)
    if not MODEL_NAME_RE.fullmatch(v):
        raise ApiError(422, f"field {key!r} must be a model name of {MODEL_NAME_RULE}, got {show(v)}", param=key)
    return v


# POST /v1/models: the accepted range of every number (prices in USD per million tokens)
MODEL_LIMITS = {"price_in_per_mtok": (0.0, 1e5), "price_out_per_mtok": (0.0, 1e5), "ttft_s": (0.0, 3600.0),
                "tokens_per_s": (1e-3, 1e6), "prior": (-100.0, 100.0)}  # tokens_per_s: no float32 underflow to 0
MODEL_FIELDS = {"name", "price_in_per_mtok", "price_out_per_mtok", "ttft_s", "tokens_per_s", "max_concurrency",
                "prior", "backend"}


def model_spec(body: dict, load_slots: int, defaults: dict) -> dict:
    """The checked spec of an LLM to add (POST /v1/models, and journal records on replay): name,
    price_in/price_out (USD per token), ttft_s, tokens_per_s, max_concurrency, prior ("uninformative",
    "mean" or a number); a 422 naming the first field out of its range. `defaults`: ttft_s,
    tokens_per_s, max_concurrency when absent. The backend is checked by the caller."""
    reject_unknown(body, MODEL_FIELDS)
    name = get_model_name(body)
    lim = MODEL_LIMITS
    pin = get_number(body, "price_in_per_mtok", default=..., lo=lim["price_in_per_mtok"][0],
                     hi=lim["price_in_per_mtok"][1])
    pout = get_number(body, "price_out_per_mtok", default=..., lo=lim["price_out_per_mtok"][0],
                      hi=lim["price_out_per_mtok"][1])
    ttft = get_number(body, "ttft_s", default=defaults["ttft_s"], lo=lim["ttft_s"][0], hi=lim["ttft_s"][1])
    tps = get_number(body, "tokens_per_s", default=defaults["tokens_per_s"], lo=lim["tokens_per_s"][0],
                     hi=lim["tokens_per_s"][1])
    conc = get_number(body, "max_concurrency", default=min(defaults["max_concurrency"], load_slots), lo=1,
                      hi=load_slots, integer=True)
    prior = body.get("prior")
    if prior is None or prior in ("uninformative", "mean"):
        prior = prior or "uninformative"
    elif is_num(prior):
        prior = float(get_number(body, "prior", lo=lim["prior"][0], hi=lim["prior"][1]))
    else:
        raise ApiError(422, f"field 'prior' must be \"uninformative\", \"mean\" or a number in "
                            f"[{lim['prior'][0]:g}, {lim['prior'][1]:g}] (the prior quality), got {show(prior)}",
                       param="prior")
    return {"name": name, "price_in": pin * 1e-6, "price_out": pout * 1e-6, "ttft_s": float(ttft),
            "tokens_per_s": float(tps), "max_concurrency": int(conc), "prior": prior}


def get_bool(obj: dict, key: str, default: bool) -> bool:
    """A true/false field (the default when absent), or a 422."""
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise ApiError(422, f"field {key!r} must be true or false", param=key)
    return v


def reject_unknown(obj: dict, known: set, where: str = "") -> None:
    """A 422 naming the fields of `obj` not in `known`."""
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ApiError(422, f"unknown field(s) {[where + k for k in unknown]} (known: {sorted(known)})",
                       param=where + unknown[0])


MAX_COST_WEIGHT = 1e12  # quality per USD
MAX_COST_USD = 1e6  # per request


def policy_fields(body: dict) -> tuple[float | None, float | None]:
    """The optional per-request policy: (cost_weight in [0, 1e12], max_cost_usd in (0, 1e6]: the
    request's cost cap in USD), None when absent."""
    return (get_number(body, "cost_weight", lo=0, hi=MAX_COST_WEIGHT),
            get_number(body, "max_cost_usd", lo=0, hi=MAX_COST_USD, lo_open=True))


def check_prompt(p, where: str, max_chars: int) -> str:
    """A non-blank prompt string of at most `max_chars` characters (413 when longer)."""
    if not isinstance(p, str):
        raise ApiError(422, f"{where} must be a string, got {type(p).__name__}", param="prompt")
    if not p.strip():
        raise ApiError(422, f"{where} is empty", param="prompt")
    if len(p) > max_chars:
        raise ApiError(413, f"{where} has {len(p)} characters, more than the limit of {max_chars}",
                       param="prompt")
    return p


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
    """The text a chat request is routed on: its last non-blank user message ("last_user"; else the
    whole conversation) or the whole conversation ("conversation") as "role: text" lines."""
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

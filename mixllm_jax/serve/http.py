"""Errors and request parsing: ApiError, OpenAI-style error bodies, JSON bodies, request fields.

Every helper raises `ApiError` with a message naming the field at fault; the app answers it as
``{"error": {"message", "type", "param"}}`` with the error's status.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse

MAX_NAME = 200


class ApiError(Exception):
    """An error answered to the client: HTTP status, message naming the problem, OpenAI-style type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


def error_response(status: int, message: str, type: str, param=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param}}, status_code=status,
                        headers=headers)


def _reject_constant(c):
    raise ValueError(f"{c} is not allowed in JSON (numbers must be finite)")


def parse_json(body: bytes, limit: int) -> Any:
    """A JSON document of at most `limit` bytes, UTF-8, finite numbers only."""
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
    """The request's body as a JSON object, read in chunks and refused (413) past `limit` bytes."""
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
    elif not is_num(v):
        raise ApiError(422, f"field {name!r} must be a number, got {json.dumps(v)[:60]}", param=name)
    if not math.isfinite(v):
        raise ApiError(422, f"field {name!r} must be finite, got {v}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(422, f"field {name!r} must be {'>' if lo_open else '>='} {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(422, f"field {name!r} must be <= {hi}, got {v}", param=name)
    return v


def get_string(obj: dict, key: str, *, default=None, max_len: int = MAX_NAME, where: str = "") -> Any:
    """A non-empty string field of at most `max_len` characters (or the default), or a 422."""
    name = where + key
    if _absent(obj, key, default, name):
        return default
    v = obj[key]
    if not isinstance(v, str) or not v:
        raise ApiError(422, f"field {name!r} must be a non-empty string, got {json.dumps(v)[:60]}", param=name)
    if len(v) > max_len:
        raise ApiError(422, f"field {name!r} is {len(v)} characters long, more than {max_len}", param=name)
    return v


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


def policy_fields(body: dict) -> tuple[float | None, float | None]:
    """The optional per-request policy: (cost_weight >= 0, budget > 0 USD), None when absent."""
    return get_number(body, "cost_weight", lo=0), get_number(body, "budget", lo=0, lo_open=True)


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

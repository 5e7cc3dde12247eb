"""A tiny OpenAI-compatible chat backend for tests and the load generator (loopback only).

    python tests/stub_backend.py --port 9001 [--delay-s 0.0] [--hang-s 30]

The first path segment picks a behaviour, so one process serves several "backends":
  /ok/v1/chat/completions      answers (JSON, or SSE chunks when "stream": true), with usage
  /fail/v1/chat/completions    HTTP 500
  /hang/v1/chat/completions    sleeps --hang-s seconds before answering (to trip the proxy's timeout)
  /bad/v1/chat/completions     HTTP 200 with a body that is not JSON
  /reject/v1/chat/completions  HTTP 400 (a client error, which the proxy passes through)
  /drip/v1/chat/completions    streams "max_tokens" (default 40) one-word content deltas, one every
                               --drip-s seconds (a stream a client can cut part-way)
  /cut/v1/chat/completions     streams half of "max_tokens" one-word deltas, then drops the connection
GET /_requests lists the bodies received (most recent 200), GET /_health answers "ok".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER = "This is the stub backend's answer to your question."


def build_app(delay_s: float = 0.0, hang_s: float = 30.0, drip_s: float = 0.1) -> Starlette:
    received: collections.deque = collections.deque(maxlen=200)

    async def chat(request: Request):
        behaviour = request.path_params["behaviour"]
        body = await request.json()
        received.append({"behaviour": behaviour, "body": body, "headers": dict(request.headers)})
        if behaviour == "fail":
            return JSONResponse({"error": {"message": "stub failure", "type": "server_error"}}, status_code=500)
        if behaviour == "reject":
            return JSONResponse({"error": {"message": "stub rejects this request", "type": "invalid_request_error"}},
                                status_code=400)
        if behaviour == "bad":
            return PlainTextResponse("this is not json")
        if behaviour == "hang":
            await asyncio.sleep(hang_s)
        elif delay_s > 0:
            await asyncio.sleep(delay_s)
        model = body.get("model", "stub")
        words = ANSWER.split(" ")
        if behaviour in ("drip", "cut"):
            n = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else 40
            words = [f"w{i}" for i in range(n)]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])
                            if isinstance(m, dict))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        cid = f"chatcmpl-stub-{time.monotonic_ns()}"
        if not body.get("stream"):
            return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                              "finish_reason": "stop"}],
                                 "usage": usage})
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))

        async def events():
            def chunk(delta, finish=None):
                return {"id": cid, "object": "chat.completion.chunk", "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            yield f"data: {json.dumps(chunk({'role': 'assistant'}))}\n\n"
            for i, w in enumerate(words):
                if behaviour == "cut" and i == len(words) // 2:
                    raise ConnectionAbortedError("the stub cuts the stream")
                if behaviour == "drip":
                    await asyncio.sleep(drip_s)
                yield f"data: {json.dumps(chunk({'content': (' ' if i else '') + w}))}\n\n"
            yield f"data: {json.dumps(chunk({}, 'stop'))}\n\n"
            if include_usage:
                yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def requests_seen(request: Request):
        return JSONResponse(list(received))

    async def health(request: Request):
        return PlainTextResponse("ok")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    return Starlette(routes=[
        Route("/{behaviour}/v1/chat/completions", chat, methods=["POST"]),
        Route("/{behaviour}/v1/models", models, methods=["GET"]),
        Route("/_requests", requests_seen, methods=["GET"]),
        Route("/_health", health, methods=["GET"]),
    ])


def main(argv=None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-s", type=float, default=0.0, help="delay of an /ok answer")
    p.add_argument("--hang-s", type=float, default=30.0, help="delay of a /hang answer")
    p.add_argument("--drip-s", type=float, default=0.1, help="delay between the deltas of a /drip stream")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the stub backend serves loopback only")
    uvicorn.run(build_app(a.delay_s, a.hang_s, a.drip_s), host=a.host, port=a.port, log_level="warning", access_log=False,
                backlog=2048)


if __name__ == "__main__":
    main()

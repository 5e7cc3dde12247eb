"""Helpers of the HTTP service tests: the server and the stub backend as child processes on 127.0.0.1.

test_server.py, test_security.py and test_fuzz.py use them through the session fixtures of
conftest.py: one small router trained once (100 RouterBench queries, a tiny head, max_length 64,
restored with the real MiniLM encoder) and one stub backend process; each server copies the router
checkpoint into its own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.loadgen import free_port, wait_http  # noqa: F401  (the tests' servers start through them)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Which of these animals is a mammal? (A) shark (B) whale (C) trout (D) eel"
START_TIMEOUT_S = 180  # a bound on waiting for startup, not a performance assertion
JSON = {"content-type": "application/json"}


def train_small_router(tmp: Path) -> tuple[Path, list[str]]:
    """A small router (34 queries per RouterBench task, one ridge, no cross-fitting: quick) saved with
    Orbax: (checkpoint dir, models)."""
    from mixllm_jax.store import checkpoint
    from mixllm_jax import data
    from mixllm_jax.text import encoder
    from mixllm_jax.offline import train
    from mixllm_jax.core.config import Budget, HeadConfig, RouterConfig

    enc = encoder.load_encoder()
    ds = data.load_routerbench(split="train")
    idx = np.concatenate([np.flatnonzero([t == (task,) for t in ds.tags])[:34]
                          for task in sorted({t[0] for t in ds.tags})])
    ds = ds.select(idx)
    e = enc.embed(ds.prompts, max_length=64)
    router = train.train_router(ds, data.load_models(data.routerbench_dir() / "models.json"), enc,
                                RouterConfig(head=HeadConfig(hidden=32, features=8, epochs=5), max_length=64,
                                             budget=Budget("cost_weight", 0.0), folds=0, ridges=(1.0,),
                                             ridge_selection="evidence"),
                                embeddings=e, progress=False)
    ck = tmp / "ck"
    checkpoint.save_router(router, ck)
    return ck, list(ds.models)


def start_stub(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tmp / "stub.log"
    stub = subprocess.Popen([sys.executable, str(REPO / "tests" / "stub_backend.py"), "--port", str(port),
                             "--hang-s", "20"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(stub, url + "/_health", log, START_TIMEOUT_S)
    return stub, url


def write_keys(path: Path, keys: dict) -> Path:
    """A keys file at `path` (only the keys' SHA-256): keys = {name: (plaintext, roles, budget or None)}."""
    from mixllm_jax.serve.auth import hash_key

    path.write_text(json.dumps({"keys": [dict({"name": n, "sha256": hash_key(k), "roles": roles},
                                              **({"budget": b} if b else {}))
                                         for n, (k, roles, b) in keys.items()]}))
    return path


def write_backends(path: Path, stub_url: str, models: list[str], allow: bool = True, key_env: str | None = None,
                   more_allowed=()) -> Path:
    """backends.yaml: every model on the stub's /ok backend (the first renamed at the backend),
    and the stub's host:port on the allow-list when `allow` (its key in `key_env`), with
    `more_allowed` host:port entries."""
    backends = {m: {"base_url": f"{stub_url}/ok/v1"} for m in models}
    backends[models[0]]["model"] = "renamed-at-backend"
    doc = {"backends": backends}
    if allow:
        host = stub_url.split("//", 1)[1]
        doc["allow_hosts"] = [{"host": host, "api_key_env": key_env} if key_env else host, *more_allowed]
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


class ServerProc:
    """The router service as a child process; restartable on the same port and folders.

    `key`: the API key sent with every request (Authorization: Bearer), unless a call passes its
    own `key=` ("" for none)."""

    def __init__(self, tmp: Path, checkpoint: Path, backends: Path, extra_args=(), key: str | None = None,
                 env: dict | None = None):
        self.tmp, self.checkpoint, self.backends = tmp, checkpoint, backends
        self.extra_args, self.key, self.env = list(extra_args), key, dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0

    @classmethod
    def from_router(cls, tmp: Path, router_ck: Path, backends: Path, **kw) -> "ServerProc":
        ck = tmp / "ck"
        shutil.copytree(router_ck, ck)
        return cls(tmp, ck, backends, **kw)

    def start(self, wait: bool = True) -> None:
        """Start the server; with wait=False, return at once (then call `wait()`)."""
        self.starts += 1
        self.log = self.tmp / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "mixllm_jax.serve", "--checkpoint", str(self.checkpoint),
               "--backends", str(self.backends), "--port", str(self.port), "--log-dir", str(self.tmp / "serve"),
               "--max-batch", "8", "--queue-limit", "8", "--window-ms", "2", "--max-prompt-chars", "4000",
               "--checkpoint-every-s", "3600", *self.extra_args]
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", JAX_PLATFORMS="cpu", **self.env)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait()

    def wait(self) -> None:
        wait_http(self.proc, self.url + "/healthz", self.log, START_TIMEOUT_S)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"server did not stop within {timeout} s after {sig!r}:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def headers(self, key=None, extra=None) -> dict:
        key = self.key if key is None else key
        h = {"authorization": f"Bearer {key}"} if key else {}
        h.update(extra or {})
        return h

    def get(self, path, key=None, **kw):
        return httpx.get(self.url + path, timeout=60, headers=self.headers(key, kw.pop("headers", None)), **kw)

    def post(self, path, body=None, key=None, **kw):
        headers = kw.pop("headers", None)
        if body is not None:
            kw["json"] = body
        elif "content" in kw and not any(k.lower() == "content-type" for k in (headers or {})):
            headers = {**JSON, **(headers or {})}
        return httpx.post(self.url + path, timeout=60, headers=self.headers(key, headers), **kw)

    def patch(self, path, body, key=None):
        return httpx.patch(self.url + path, json=body, timeout=60, headers=self.headers(key))

    def put(self, path, body, key=None):
        return httpx.put(self.url + path, json=body, timeout=60, headers=self.headers(key))

    def delete(self, path, key=None):
        return httpx.delete(self.url + path, timeout=60, headers=self.headers(key))

    def route(self, prompt=PROMPT, **extra):
        r = self.post("/v1/route", {"prompt": prompt, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    def observations(self) -> dict:
        return {m["id"]: m["observations"] for m in self.get("/v1/models").json()["data"] if m["kind"] == "llm"}

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(self.get("/metrics").text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

"""Serve options: one dataclass of nested option groups, and the command-line options generated from it.

Light to import (no JAX, no web stack): `mixllm-jax --help` and `mixllm-jax serve --help` read it.
Each field's metadata holds its help text and, where the flag is not the plain ``--field-name``
with a value, how the command line spells it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

ROUTE_ON = ("last_user", "conversation")
PINNED = ("allow", "refuse")


def _opt(default, help: str, **cli):
    """A field with its help text; `cli`: flag, choices, action, type (argparse keywords)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def _off_is_none(value: str) -> str | None:
    return None if value == "off" else value


@dataclasses.dataclass
class HttpOptions:
    """The HTTP server: where it listens, who may call it, and its connection bounds."""

    host: str = _opt("127.0.0.1", "address to bind (a non-loopback one needs --api-keys or --insecure)")
    port: int = _opt(8000, "TCP port")
    api_keys: str | Path | None = _opt(None, "API keys file (JSON/YAML: SHA-256 of each key and its roles "
                                             "route, feedback, admin); without it anyone who reaches the port "
                                             "may call every endpoint")
    insecure: bool = _opt(False, "allow binding a non-loopback --host without --api-keys", action="store_true")
    header_timeout_s: float = _opt(10.0, "a connection whose request headers have not all arrived this long "
                                         "after their first byte (or after connecting) is closed")
    body_timeout_s: float = _opt(30.0, "a request body not received within this is answered 408 and its "
                                       "connection closed")
    max_connections: int = _opt(1024, "open connections at most: a new one past it closes the oldest idle one "
                                      "(no request being answered), else its request gets 503")
    max_connections_per_ip: int = _opt(256, "open connections of one client address at most: a new one past it "
                                            "closes that client's oldest idle one, else it is closed (behind a "
                                            "reverse proxy every client has its address: raise it to "
                                            "--max-connections)")
    max_body_bytes: int = _opt(4 << 20, "larger request bodies are refused with 413")


@dataclasses.dataclass
class Limits:
    """What one request, the feature store and the live LLMs may hold at most."""

    max_prompt_chars: int = _opt(100_000, "longer prompts are refused with 413")
    max_prompts: int = _opt(256, "prompts per /v1/route request")
    feature_cache: int = _opt(20000, "routed requests whose features are kept for feedback")
    max_llms: int = _opt(64, "live LLMs at most: POST /v1/models is refused past it, so the arm capacity "
                             "stays at most twice this")
    max_inflight_proxy: int = _opt(256, "proxied calls in flight, at most (then 503)")


@dataclasses.dataclass
class Batching:
    """The micro-batcher of the routing worker."""

    window_ms: float = _opt(3.0, "micro-batch window (ms)")
    max_batch: int = _opt(64, "prompts per routing call, at most")
    queue_limit: int = _opt(1024, "prompts waiting, at most (then 429)")
    book_load: bool = _opt(True, "decisions do not book predicted load on the live load model (by default a "
                                 "chat call books its LLM's predicted service time, a /v1/route request only "
                                 "when it asks: \"book_load\": true)", flag="--no-book-load", action="store_false")
    booking_ttl_s: float = _opt(60.0, "seconds after which what is left of a /v1/route request's booking is taken "
                                      "off the load model (its call may never come)")
    max_booked_per_key: int = _opt(32, "/v1/route bookings an API key holds at once, at most (past it a route is "
                                       "answered, not booked)")


@dataclasses.dataclass
class GatewayOptions:
    """The chat gateway: what is routed on, fallbacks, pinned requests, context windows."""

    route_on: str = _opt("last_user", "what of a chat request is routed on: the last user message or the "
                                      "whole conversation", choices=ROUTE_ON)
    fallbacks: int = _opt(2, "other LLMs a chat request tries, next-best first, after a backend error or timeout "
                             "(before the first byte of the answer; 0: none)")
    cooldown_s: float = _opt(30.0, "seconds an LLM whose backend failed is not eligible for chat")
    pinned_models: str = _opt("allow", "a chat or route request whose 'model' names an LLM goes to it (allow) or is "
                                       "refused with 400 (refuse)", choices=PINNED)
    context_windows: str | None = _opt(None, "a models file or catalog:NAME whose context_window entries apply to "
                                             "the served LLMs of the same name (a backend's context_window wins)")


@dataclasses.dataclass
class ClusterOptions:
    """Replicas (--cluster): the shared stream, this replica, the shared checkpoints."""

    url: str | None = _opt(None, "nats://HOST:PORT of a NATS server with JetStream: replicas share every state "
                                 "change through its stream and decisions through its key-value bucket "
                                 "(see 'Running several replicas'); without it the local journal",
                           flag="--cluster", dest="cluster")
    stream: str = _opt("mixllm", "with --cluster: the JetStream stream (and '<stream>-decisions' bucket) name")
    replica: str | None = _opt(None, "with --cluster: this replica's name, its checkpoint folder under "
                                     "--shared-checkpoints (default: HOST-PORT)")
    shared_checkpoints: str | Path | None = _opt(None, "with --cluster: the folder every replica saves checkpoints "
                                                       "into and restores the newest from (default: <checkpoint>.cluster)")
    decision_ttl_s: float = _opt(3600.0, "with --cluster: seconds a decision can take feedback on any replica")
    concurrency_share: float = _opt(1.0, "share of each LLM's max_concurrency this replica's load model books "
                                         "against (1/replicas when the LLMs' limits are split among them)")

    @property
    def enabled(self) -> bool:
        return self.url is not None


GROUPS = {"http": HttpOptions, "limits": Limits, "batching": Batching, "gateway": GatewayOptions,
          "cluster": ClusterOptions}


def _group(cls):
    return dataclasses.field(default_factory=cls, metadata={"group": cls})


@dataclasses.dataclass
class ServeConfig:
    """Every option of the router service (`mixllm-jax serve`, `python -m mixllm_jax.serve`): the
    top-level ones and one nested dataclass per group (GROUPS). Each leaf field is one command-line
    option, named after the field (or its metadata's `flag`); `ServeConfig.of` takes them flat."""

    checkpoint: str | Path = dataclasses.field(metadata={
        "help": "Orbax checkpoint directory (restored, and saved into)", "required": True})
    backends: str | Path | None = _opt(None, "backends.yaml: LLM name -> OpenAI-compatible base_url, and "
                                             "allow_hosts: the hosts POST /v1/models may point a backend at")
    log_dir: str | Path | None = _opt(None, "journal and request logs (default: <checkpoint>.serve)")
    checkpoint_every_s: float = _opt(60.0, "seconds between periodic Orbax checkpoints (also saved on SIGTERM)")
    keep_checkpoints: int = _opt(3, "checkpoint steps kept")
    compilation_cache: str | Path | None = _opt(
        "auto", "JAX persistent compilation cache dir ('auto': the cache directory's jax/, "
        "$MIXLLM_CACHE or ~/.cache/mixllm-jax; 'off')", type=_off_is_none)
    warmup: bool = _opt(False, "compile every batch/length shape before serving", action="store_true")
    seed: int | None = _opt(None, "seed of the exploration draws (Thompson, softmax, epsilon): the k-th stochastic "
                                  "batch uses the k-th split of PRNGKey(seed) (default: a random seed)", type=int)
    http: HttpOptions = _group(HttpOptions)
    limits: Limits = _group(Limits)
    batching: Batching = _group(Batching)
    gateway: GatewayOptions = _group(GatewayOptions)
    cluster: ClusterOptions = _group(ClusterOptions)

    @classmethod
    def of(cls, **options) -> ServeConfig:
        """The config of options named flat, as on the command line (their `dest`s: ``port=9``,
        ``cluster="nats://..."``); TypeError naming an unknown one."""
        unknown = set(options) - {dest(f) for _, f in leaf_fields()}
        if unknown:
            raise TypeError(f"unknown serve option(s): {sorted(unknown)}")
        groups = {name: g(**{f.name: options[dest(f)] for f in dataclasses.fields(g) if dest(f) in options})
                  for name, g in GROUPS.items()}
        top = {f.name: options[f.name] for group, f in leaf_fields() if group is None and f.name in options}
        return cls(**top, **groups)

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        if not self.batching.window_ms >= 0:
            raise ValueError(f"window_ms must be >= 0, got {self.batching.window_ms}")
        for k, v in (("max_batch", self.batching.max_batch), ("queue_limit", self.batching.queue_limit),
                     ("max_prompt_chars", self.limits.max_prompt_chars), ("max_prompts", self.limits.max_prompts),
                     ("max_body_bytes", self.http.max_body_bytes), ("feature_cache", self.limits.feature_cache),
                     ("max_inflight_proxy", self.limits.max_inflight_proxy),
                     ("keep_checkpoints", self.keep_checkpoints), ("max_llms", self.limits.max_llms),
                     ("max_connections", self.http.max_connections),
                     ("max_connections_per_ip", self.http.max_connections_per_ip)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        b = self.batching
        if not 0 < b.booking_ttl_s <= 86400:
            raise ValueError(f"booking_ttl_s must be in (0, 86400] seconds, got {b.booking_ttl_s}")
        if not isinstance(b.max_booked_per_key, int) or b.max_booked_per_key < 0:
            raise ValueError(f"max_booked_per_key must be an integer >= 0, got {b.max_booked_per_key!r}")
        if b.queue_limit < b.max_batch:
            raise ValueError(f"queue_limit ({b.queue_limit}) must be >= max_batch ({b.max_batch})")
        if not isinstance(self.gateway.fallbacks, int) or not 0 <= self.gateway.fallbacks <= 16:
            raise ValueError(f"fallbacks must be an integer in [0, 16], got {self.gateway.fallbacks!r}")
        if not 0 <= self.gateway.cooldown_s <= 86400:
            raise ValueError(f"cooldown_s must be in [0, 86400] seconds, got {self.gateway.cooldown_s}")
        if self.gateway.pinned_models not in PINNED:
            raise ValueError(f"pinned_models must be one of {PINNED}, got {self.gateway.pinned_models!r}")
        if self.gateway.route_on not in ROUTE_ON:
            raise ValueError(f"route_on must be one of {ROUTE_ON}, got {self.gateway.route_on!r}")
        if not self.checkpoint_every_s > 0:
            raise ValueError(f"checkpoint_every_s must be > 0, got {self.checkpoint_every_s}")
        for k in ("header_timeout_s", "body_timeout_s"):
            if not 0 < getattr(self.http, k) <= 3600:
                raise ValueError(f"{k} must be in (0, 3600] seconds, got {getattr(self.http, k)}")
        if not 0 < self.cluster.concurrency_share <= 1:
            raise ValueError(f"concurrency_share must be in (0, 1], got {self.cluster.concurrency_share}")
        if self.cluster.enabled:
            from mixllm_jax.serve.cluster import check_name, check_url

            check_url(self.cluster.url)
            check_name(self.cluster.stream, "stream")
            if self.cluster.replica is not None:
                check_name(self.cluster.replica, "replica")
            if not 60 <= self.cluster.decision_ttl_s <= 30 * 86400:
                raise ValueError(f"decision_ttl_s must be in [60, 2592000] seconds, got {self.cluster.decision_ttl_s}")
        from mixllm_jax.serve.auth import is_loopback

        if self.http.api_keys is None and not self.http.insecure and not is_loopback(self.http.host):
            raise ValueError(f"refusing to serve on {self.http.host} without API keys: anyone who reaches it could "
                             f"add backends and models; give --api-keys FILE (or --insecure to accept that)")

    def _beside_checkpoint(self, given, suffix: str) -> Path:
        if given is not None:
            return Path(given)
        ck = Path(self.checkpoint).absolute()
        return ck.with_name(ck.name + suffix)

    @property
    def log_path(self) -> Path:
        """The journal and request-feature folder."""
        return self._beside_checkpoint(self.log_dir, ".serve")

    @property
    def shared_path(self) -> Path:
        """With --cluster: the folder of every replica's checkpoints."""
        return self._beside_checkpoint(self.cluster.shared_checkpoints, ".cluster")

    @property
    def save_path(self) -> Path:
        """Where checkpoints are saved: --checkpoint (with --cluster: this replica's folder under the
        shared one)."""
        return self.shared_path / self.replica_name if self.cluster.enabled else Path(self.checkpoint)

    @property
    def side_path(self) -> Path:
        """Where spend.json and live_models.json are saved: the log folder (with --cluster: the
        replica's checkpoint folder)."""
        return self.save_path if self.cluster.enabled else self.log_path

    @property
    def replica_name(self) -> str:
        import re
        import socket

        return self.cluster.replica or re.sub(r"[^A-Za-z0-9_-]", "-", f"{socket.gethostname()}-{self.http.port}")[-64:]


def dest(f: dataclasses.Field) -> str:
    """A leaf field's argparse dest: the field's name, or its metadata's `dest`."""
    return f.metadata.get("dest", f.name)


def leaf_fields() -> list[tuple[str | None, dataclasses.Field]]:
    """(group name or None for a top-level option, field) of every option, in order."""
    out = [(None, f) for f in dataclasses.fields(ServeConfig) if "group" not in f.metadata]
    return out + [(name, f) for name, g in GROUPS.items() for f in dataclasses.fields(g)]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """One option per leaf field of ServeConfig: ``--field-name`` (or the field's `flag`), its help
    and default; a group's options under its own heading of --help."""
    sections = {None: p, **{name: p.add_argument_group(f"{name} options", g.__doc__)
                            for name, g in GROUPS.items()}}
    for group, f in leaf_fields():
        meta = dict(f.metadata)
        meta.pop("dest", None)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kw = {"dest": dest(f), "help": meta.pop("help"), **meta}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
            if "action" not in kw and f.default is not None:
                kw["help"] += " (default: %(default)s)"
        if "action" not in kw and "type" not in kw and isinstance(f.default, (int, float)):
            kw["type"] = type(f.default)
        sections[group].add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of options parsed by a parser given `add_serve_arguments`."""
    return ServeConfig.of(**{dest(f): getattr(args, dest(f)) for _, f in leaf_fields()})

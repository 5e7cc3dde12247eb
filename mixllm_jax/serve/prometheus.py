"""Prometheus metrics of the router service (GET /metrics), in a registry of their own, in groups:
HTTP, routing, journal (and checkpoints), learning (feedback, live LLMs), backends (and spend)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAG_BUCKETS = (.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2,
               5, 10, 30)


class HttpMetrics:
    """HTTP calls by endpoint (app.py)."""

    def __init__(self, r: CollectorRegistry):
        self.requests = Counter("mixllm_http_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.seconds = Histogram("mixllm_http_request_seconds", "time to answer (first byte when streaming)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)


class RoutingMetrics:
    """Routing batches, decisions and overload (routing.py; app.py)."""

    def __init__(self, r: CollectorRegistry):
        self.batch = Histogram("mixllm_route_batch_size", "prompts per routing call", buckets=BATCH_BUCKETS,
                               registry=r)
        self.batch_s = Histogram("mixllm_route_batch_seconds", "seconds per routing call", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.decisions = Counter("mixllm_decisions_total", "routing decisions by chosen LLM", ["model"], registry=r)
        self.rejected = Counter("mixllm_rejected_total", "requests refused for overload", ["reason"], registry=r)
        self.queue = Gauge("mixllm_queue_prompts", "prompts accepted and not yet routed", registry=r)


class LearningMetrics:
    """Feedback records and live LLMs (intake.py, spend.py, live_models.py)."""

    def __init__(self, r: CollectorRegistry):
        self.feedback = Counter("mixllm_feedback_total", "feedback records journaled, by kind", ["kind"], registry=r)
        self.dropped = Counter("mixllm_feedback_dropped_total",
                               "feedback not applied because its LLM was removed meanwhile", registry=r)
        self.models = Gauge("mixllm_models", "live LLMs", registry=r)


class BackendMetrics:
    """Backend calls, fallbacks, spend and decisions by key (proxy.py, gateway.py, spend.py)."""

    def __init__(self, r: CollectorRegistry):
        self.seconds = Histogram("mixllm_backend_seconds", "backend call latency by LLM", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.failures = Counter("mixllm_backend_failures_total", "failed backend calls", ["model", "reason"],
                                registry=r)
        self.spend = Counter("mixllm_spend_usd_total", "USD spent on proxied calls by API key and LLM "
                             "(backend-reported usage at the LLM's prices, else predicted)", ["key", "model"],
                             registry=r)
        self.key_decisions = Counter("mixllm_key_decisions_total", "routing decisions by API key and chosen LLM",
                                     ["key", "model"], registry=r)
        self.failure_rate = Gauge("mixllm_backend_failure_rate", "each LLM's recent backend failure rate (failed "
                                  "calls / calls, decayed with a 5 min half-life; an availability signal)",
                                  ["model"], registry=r)
        self.fallbacks = Counter("mixllm_fallbacks_total", "chat calls retried on another LLM, by failed LLM",
                                 ["model"], registry=r)


class JournalMetrics:
    """The journal, its application and the checkpoints (applier.py, snapshots.py)."""

    def __init__(self, r: CollectorRegistry):
        self.skipped = Counter("mixllm_journal_skipped_total",
                               "journal records that failed to apply (logged, skipped)", registry=r)
        self.journal_seq = Gauge("mixllm_journal_seq", "last journaled sequence number", registry=r)
        self.torn_tails = Gauge("mixllm_journal_torn_tails", "torn last lines of the journal dropped at start: "
                                "each possibly acknowledged (see store/journal.py)", registry=r)
        self.applied_seq = Gauge("mixllm_applied_seq", "last applied sequence number", registry=r)
        self.ckpt_step = Gauge("mixllm_checkpoint_step", "last checkpoint step saved or restored", registry=r)
        self.event_lag = Histogram("mixllm_event_lag_seconds", "--cluster: seconds from an event's publish (on any "
                                   "replica) to its application here", buckets=LAG_BUCKETS, registry=r)
        self.ckpts = Counter("mixllm_checkpoints_total", "checkpoints saved", registry=r)


class Metrics:
    """Counters, gauges and histograms of one service, by group (see the module docstring)."""

    def __init__(self):
        prometheus_client.disable_created_metrics()  # no *_created series beside every counter
        r = self.registry = CollectorRegistry()
        self.http = HttpMetrics(r)
        self.routing = RoutingMetrics(r)
        self.learning = LearningMetrics(r)
        self.backends = BackendMetrics(r)
        self.journal = JournalMetrics(r)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

"""Prometheus metrics, labelled by tier and endpoint, never by key."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics in their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nnobf_requests",
            "HTTP requests by endpoint, tier (none before authentication) and status code.",
            ["endpoint", "tier", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nnobf_request_seconds",
            "Request latency by endpoint and tier.",
            ["endpoint", "tier"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.samples = Counter(
            "nnobf_samples",
            "Samples run through the model, by tier.",
            ["tier"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "nnobf_batch_size",
            "Samples per forward pass (all tiers together).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "nnobf_forward_seconds",
            "Time of one batched forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "nnobf_rate_limited",
            "Requests refused with 429 (rate limit or quota), by key tier.",
            ["tier"],
            registry=self.registry,
        )
        self.downgrades = Counter(
            "nnobf_downgrades",
            "Requests served below their key's tier, by key tier and reason (quota, load, "
            "schedule).",
            ["tier", "reason"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "nnobf_auth_failures",
            "Requests refused with 401, by reason (missing, invalid, revoked, expired, rotated).",
            ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "nnobf_queue_depth", "Requests waiting for a batch.", registry=self.registry
        )

    def record_batch(self, tiers: list[str], seconds: float) -> None:
        self.batch_size.observe(len(tiers))
        self.forward_seconds.observe(seconds)
        for tier in set(tiers):
            self.samples.labels(tier).inc(tiers.count(tier))

    def render(self) -> bytes:
        return generate_latest(self.registry)

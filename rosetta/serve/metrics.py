"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rosetta_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("rosetta_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("rosetta_requests_in_flight", "HTTP requests being served", registry=r)
        self.items = Counter("rosetta_items", "inputs received by endpoint and modality",
                             ["endpoint", "modality"], registry=r)
        self.batch_size = Histogram("rosetta_batch_size", "inputs per model call by modality",
                                    ["modality"], buckets=BATCH_BUCKETS, registry=r)
        self.model_seconds = Histogram("rosetta_model_seconds", "time of one batched model call by modality",
                                       ["modality"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_items = Gauge("rosetta_queue_items", "inputs waiting for the model by modality",
                                 ["modality"], registry=r)
        self.cache_hits = Counter("rosetta_cache_hits", "embedding cache hits by modality", ["modality"], registry=r)
        self.cache_misses = Counter("rosetta_cache_misses", "embedding cache misses by modality",
                                    ["modality"], registry=r)

        # Text generation
        self.tokens_generated = Counter("rosetta_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("rosetta_prompt_tokens", "prompt tokens read", registry=r)
        self.sequences_finished = Counter("rosetta_sequences_finished", "completions by finish reason",
                                          ["reason"], registry=r)
        self.sequences_running = Gauge("rosetta_sequences_running", "sequences being decoded together",
                                       registry=r)
        self.time_to_first_token = Histogram("rosetta_time_to_first_token_seconds",
                                             "from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.tokens_per_second = Histogram("rosetta_decode_tokens_per_second", "each completion's decoding speed",
                                           buckets=RATE_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_name(app: ASGIApp, scope: Scope) -> str:
    """The route template a request matched ("/v1/thumbnail/{id}"), not its raw path: bounded label values."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(app, "routes", ()):
            if candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "other"


class MetricsMiddleware:
    """Counts every request (errors from other middleware included) and times it, per endpoint."""

    def __init__(self, app: ASGIApp, metrics: Metrics, router: ASGIApp) -> None:
        self.app, self.metrics, self.router = app, metrics, router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            endpoint = route_name(self.router, scope)
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

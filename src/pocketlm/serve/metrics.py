"""Prometheus metrics for /metrics, in a registry of the app's own (two apps in one process,
as in the tests, must not share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pool):
        self.registry = CollectorRegistry()
        self.requests = Counter("pocketlm_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.tokens_in = Counter("pocketlm_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.tokens_out = Counter("pocketlm_completion_tokens", "Tokens generated", registry=self.registry)
        self.latency = Histogram("pocketlm_request_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("pocketlm_time_to_first_token_seconds", "Time to the first generated token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        queue = Gauge("pocketlm_queue_depth", "Requests waiting for a context", registry=self.registry)
        queue.set_function(lambda: pool.waiting)
        busy = Gauge("pocketlm_busy_contexts", "Contexts generating now", registry=self.registry)
        busy.set_function(lambda: pool.busy)

    def render(self) -> bytes:
        return generate_latest(self.registry)

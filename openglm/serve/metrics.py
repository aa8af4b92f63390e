"""Prometheus metrics of one server, named after vLLM's so that its dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (one decode step of a small model) to minutes (a long generation).
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class Metrics:
    """A private registry per app (tests run several apps in one process)."""

    def __init__(self, backend):
        """``backend``: where generations run (its ``num_running`` and ``num_waiting`` are gauges)."""
        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("openglm_num_requests_running", "Requests in the engine's running batch.", registry=r)
        waiting = Gauge("openglm_num_requests_waiting", "Requests queued for a batch slot.", registry=r)
        running.set_function(lambda: backend.num_running)
        waiting.set_function(lambda: backend.num_waiting)
        self.prompt_tokens = Counter("openglm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("openglm_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("openglm_request_success", "Finished requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.errors = Counter("openglm_request_errors", "Requests answered with an error, by HTTP status.",
                              ["status"], registry=r)
        self.ttft = Histogram("openglm_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("openglm_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("openglm_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("openglm_request_queue_time_seconds", "Time a request waited for a batch slot.",
                               buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""What `minigpt serve` counts, in Prometheus' text format (/metrics). The scheduler and the HTTP layer
report to it; neither reads it back."""

from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("minigpt_requests", "Completion requests by HTTP status", ["status"],
                                registry=registry)
        self.tokens = Counter("minigpt_generated_tokens", "Tokens generated", registry=registry)
        self.draft_tokens = Counter("minigpt_draft_accepted_tokens", "Tokens generated as a draft's accepted "
                                    "guesses (speculative decoding), counted in minigpt_generated_tokens too",
                                    registry=registry)
        self.verify_steps = Counter("minigpt_verify_steps", "Steps that verified a draft's guesses",
                                    registry=registry)
        self.queue_depth = Gauge("minigpt_queue_depth", "Requests waiting for rows", registry=registry)
        self.rows_in_use = Gauge("minigpt_rows_in_use", "Rows of the batch holding a sequence", registry=registry)
        self.batch_rows = Histogram("minigpt_batch_rows", "Rows in the batch at each step", registry=registry,
                                    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.time_to_first_token = Histogram("minigpt_time_to_first_token_seconds", "From arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("minigpt_inter_token_latency_seconds",
                                             "Between decode steps: the wait of every row in the batch for its "
                                             "next token", buckets=LATENCY_BUCKETS, registry=registry)

    def answered(self, status: int) -> None:
        self.requests.labels(str(status)).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

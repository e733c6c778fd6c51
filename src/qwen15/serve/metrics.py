"""Prometheus metrics of one server (its own registry, so several apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qwen15_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwen15_prompt_tokens", "prompt tokens of finished sequences", registry=r)
        self.generation_tokens = Counter("qwen15_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("qwen15_sequences_finished", "sequences finished by reason", ["reason"], registry=r)
        self.queue_depth = Gauge("qwen15_queue_depth", "sequences waiting for a batch slot", registry=r)
        self.running = Gauge("qwen15_running_sequences", "sequences in the running batch", registry=r)
        self.batch_size = Gauge("qwen15_batch_size", "rows in the latest engine step", registry=r)
        self.kv_used = Gauge("qwen15_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.kv_free = Gauge("qwen15_kv_blocks_free", "KV cache blocks free or evictable (cached, unreferenced)", registry=r)
        self.kv_total = Gauge("qwen15_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.prefix_hits = Gauge("qwen15_prefix_cache_hit_blocks", "blocks reused from the prefix cache so far", registry=r)
        self.steps = Gauge("qwen15_engine_steps", "engine steps run so far", registry=r)
        self.step_seconds = Gauge("qwen15_engine_step_seconds", "time spent in engine steps so far (forward, "
                                  "sampling, output)", registry=r)
        self.ttft = Histogram("qwen15_time_to_first_token_seconds", "request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("qwen15_request_latency_seconds", "request arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def render(self, engine) -> bytes:
        """The exposition text, with the engine's gauges read now."""
        blocks = engine.cache.blocks
        self.queue_depth.set(engine.queue_depth())
        self.running.set(len(engine.running))
        self.batch_size.set(engine.last_batch_size)
        self.kv_used.set(blocks.used)
        self.kv_free.set(blocks.available)
        self.kv_total.set(blocks.num_blocks)
        self.prefix_hits.set(blocks.hits)
        self.steps.set(engine.steps)
        self.step_seconds.set(engine.step_seconds)
        return generate_latest(self.registry)

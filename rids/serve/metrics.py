"""Prometheus metrics of a serving engine: requests, tokens, TPF, acceptance, KV usage."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rids.engine.sequence import Sequence
from rids.llm import LLM


class Metrics:
    def __init__(self, llm: LLM) -> None:
        self.registry = registry = CollectorRegistry()
        # plain sums of what the counters count, for the TPF gauge and the load test
        self.totals = {"completion_tokens": 0, "decode_tokens": 0, "decode_forwards": 0}
        scheduler, bm = llm.engine.scheduler, llm.engine.pages
        self.requests = Counter(
            "rids_requests", "Finished requests", ["finish_reason"], registry=registry
        )
        self.prompt_tokens = Counter("rids_prompt_tokens", "Prompt tokens", registry=registry)
        self.generation_tokens = Counter(
            "rids_generation_tokens", "Committed completion tokens", registry=registry
        )
        self.decode_tokens = Counter(
            "rids_decode_tokens", "Tokens committed by decode forwards", registry=registry
        )
        self.decode_forwards = Counter(
            "rids_decode_forwards", "Per-request decode forwards", registry=registry
        )
        self.drafts_verified = Counter(
            "rids_drafts_verified", "Drafts checked, by position", ["position"], registry=registry
        )
        self.drafts_accepted = Counter(
            "rids_drafts_accepted", "Drafts accepted, by position", ["position"], registry=registry
        )
        self.copy_steps = Counter(
            "rids_copy_steps", "Decode forwards that verified copied drafts", registry=registry
        )
        self.copies_accepted = Counter(
            "rids_copies_accepted", "Copied drafts accepted", registry=registry
        )
        self.sibling_steps = Counter(
            "rids_sibling_steps",
            "Decode forwards whose first draft failed beside a sibling path",
            registry=registry,
        )
        self.sibling_accepted = Counter(
            "rids_sibling_accepted", "Sibling-path tokens accepted", registry=registry
        )
        self.errors = Counter("rids_engine_errors", "Failed engine steps", registry=registry)
        self.step_seconds = Histogram(
            "rids_step_seconds", "Seconds per batched forward", registry=registry
        )
        Gauge(
            "rids_tokens_per_forward", "Decode tokens per forward (TPF)", registry=registry
        ).set_function(lambda: self.tpf)
        Gauge("rids_requests_running", "Requests in the batch", registry=registry).set_function(
            lambda: len(scheduler.running)
        )
        Gauge("rids_requests_waiting", "Requests queued", registry=registry).set_function(
            lambda: len(scheduler.waiting)
        )
        Gauge("rids_kv_cache_usage", "Fraction of KV pages in use", registry=registry).set_function(
            lambda: 1 - bm.num_free_pages / bm.num_pages
        )
        Gauge("rids_kv_pages_free", "Free KV pages", registry=registry).set_function(
            lambda: bm.num_free_pages
        )
        Gauge("rids_preemptions", "Requests preempted so far", registry=registry).set_function(
            lambda: scheduler.num_preemptions
        )

    def arrived(self, seq: Sequence) -> None:
        self.prompt_tokens.inc(seq.num_prompt_tokens)

    def stepped(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def finished(self, seq: Sequence) -> None:
        self.requests.labels(seq.finish_reason or "length").inc()
        self.generation_tokens.inc(len(seq.completion_ids))
        self.decode_tokens.inc(seq.decode_tokens)
        self.decode_forwards.inc(seq.decode_steps)
        self.totals["completion_tokens"] += len(seq.completion_ids)
        self.totals["decode_tokens"] += seq.decode_tokens
        self.totals["decode_forwards"] += seq.decode_steps
        self.copy_steps.inc(seq.copy_steps)
        self.copies_accepted.inc(seq.copies_accepted)
        self.sibling_steps.inc(seq.sibling_steps)
        self.sibling_accepted.inc(seq.sibling_accepted)
        for i, (v, a) in enumerate(zip(seq.drafts_verified, seq.drafts_accepted, strict=True)):
            self.drafts_verified.labels(str(i + 1)).inc(v)
            self.drafts_accepted.labels(str(i + 1)).inc(a)

    @property
    def tpf(self) -> float:
        forwards = self.totals["decode_forwards"]
        return self.totals["decode_tokens"] / forwards if forwards else 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

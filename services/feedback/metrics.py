"""Prometheus metrics of the feedback service (one registry per server)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class FeedbackMetrics:
    registry: CollectorRegistry
    records: Counter  # labels: kind, result (accepted|duplicate|rejected), reason (rejected field or "")
    commit_seconds: Histogram  # one store transaction (group commit)
    commit_records: Histogram  # records per store transaction
    ack_seconds: Histogram  # labels: rpc; from receiving a batch to its result
    refused: Counter  # labels: rpc, reason (overloaded|closed|store); calls answered "retry later"
    followers: Gauge  # PullTasks calls with follow=true waiting for new tasks
    store_up: Gauge  # 1 while the store's database answers the health check, else 0

    @classmethod
    def create(cls) -> "FeedbackMetrics":
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            records=Counter(
                "hitl_feedback_records",
                "Feedback records by kind, result and rejection field",
                ["kind", "result", "reason"],
                registry=registry,
            ),
            commit_seconds=Histogram(
                "hitl_feedback_commit_seconds",
                "Latency of one durable store transaction",
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                registry=registry,
            ),
            commit_records=Histogram(
                "hitl_feedback_commit_records",
                "Records written per store transaction",
                buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
                registry=registry,
            ),
            ack_seconds=Histogram(
                "hitl_feedback_ack_seconds",
                "From a batch's arrival to its results",
                ["rpc"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            refused=Counter(
                "hitl_feedback_refused",
                "Calls answered with 'retry later' (RESOURCE_EXHAUSTED or UNAVAILABLE), by reason",
                ["reason"],
                registry=registry,
            ),
            followers=Gauge(
                "hitl_feedback_pull_followers",
                "PullTasks calls with follow=true that are open",
                registry=registry,
            ),
            store_up=Gauge(
                "hitl_feedback_store_up",
                "1 while the store's database answers the service's health check",
                registry=registry,
            ),
        )

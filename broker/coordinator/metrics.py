"""Prometheus counters of the coordinator, in a registry of their own (the web app serves it at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.coordinator.contract import ROUTING_MODES

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


def mode_label(mode: str) -> str:
    """Named-model queries share one label value, so user input cannot grow the series without bound."""
    return mode if mode in ROUTING_MODES else "model"


class CoordinatorMetrics:
    """Everything the coordinator counts; ``registry`` is what an exporter serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queries = Counter("slb_queries", "Queries by routing mode and outcome.", ["mode", "outcome"], registry=r)
        self.errors = Counter("slb_query_errors", "Failed queries by error code.", ["code"], registry=r)
        self.failovers = Counter("slb_failovers", "Jobs re-sent to another agent.", ["reason"], registry=r)
        self.answer_restarts = Counter(
            "slb_answer_restarts", "Failovers that restarted the answer (the next runtime cannot continue it).",
            registry=r)
        self.manage = Counter("slb_manage_operations", "Model operations sent to agents, by action and outcome.",
                              ["action", "outcome"], registry=r)
        self.output_tokens = Counter("slb_output_tokens", "Answer tokens generated, by model.", ["model"], registry=r)
        self.latency = Histogram("slb_query_latency_seconds", "Time from query to final answer.", ["mode"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("slb_time_to_first_token_seconds", "Time from query to first answer text.", ["mode"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.agents_online = Gauge("slb_agents_online", "Agents online now.", registry=r)
        self.agents_ready = Gauge("slb_agents_ready", "Agents with a ready model now.", registry=r)
        self.jobs_in_flight = Gauge("slb_jobs_in_flight", "Jobs sent to agents and not finished.", registry=r)
        self.replans = Counter("slb_replans", "Placement runs by trigger.", ["trigger"], registry=r)
        self.assignments = Counter("slb_assignments", "Assign messages published.", registry=r)
        self.agent_expiries = Counter("slb_agent_expiries", "Agents declared gone for missing telemetry.", registry=r)
        self.chunks = Counter("slb_result_chunks", "Result chunks received, by handling.", ["kind"], registry=r)
        self.strikes = Counter("slb_agent_strikes", "Answers that showed an agent lying (empty where another "
                                                    "agent answered, a speed far above the delivered one).",
                               registry=r)
        self.quarantines = Counter("slb_agent_quarantines", "Agents put in quarantine (no jobs) for their strikes.",
                                   registry=r)

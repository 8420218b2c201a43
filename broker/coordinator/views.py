"""What the cluster view and the HTTP API show: pure functions of the registry, the last plan and the time.

Nothing here changes state, so :meth:`Coordinator.snapshot` may be called from
any thread, as often as the UI likes.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.coordinator.contract import AgentView, ClusterSnapshot
from broker.protocol import Hardware
from broker.scheduling.availability import model_availability
from broker.scheduling.catalog import Catalog
from broker.scheduling.estimates import agent_score
from broker.scheduling.placement import Plan
from broker.scheduling.registry import AgentRecord, ClusterState


def cluster_snapshot(state: ClusterState, plan: Plan | None, catalog: Catalog, *, cooling: Mapping[str, bool],
                     connected: bool, now: float, generated_at: float) -> ClusterSnapshot:
    """The cluster at ``now`` (monotonic); ``cooling``: the agents the circuit breaker keeps idle."""
    reasons = placement_reasons(plan)
    views = [agent_view(record, catalog, reason=reasons.get(record.agent_id, ""),
                        cooling_down=cooling.get(record.agent_id, False), now=now)
             for record in sorted(state.agents.values(), key=lambda r: r.agent_id)]
    models = model_availability(state, catalog)
    return ClusterSnapshot(agents=views, ready_models=state.ready_models(), connected=connected,
                           generated_at=generated_at, servable_models=[model.name for model in models],
                           models=models)


def placement_reasons(plan: Plan | None) -> dict[str, str]:
    """Why each agent got its model (or was excluded) in the last applied plan."""
    if plan is None:
        return {}
    reasons = {entry.agent_id: entry.reason for entry in plan.entries}
    reasons.update(plan.excluded)
    return reasons


def agent_view(record: AgentRecord, catalog: Catalog, *, reason: str, cooling_down: bool, now: float) -> AgentView:
    """One agent as the cluster table shows it; measured speeds win over what telemetry claims."""
    score = agent_score(record, catalog)
    telemetry, status, model_state = record.telemetry, record.status, record.model_state
    speed = record.observed.get(record.ready_model or "") if record.ready_model else None
    return AgentView(
        id=record.agent_id,
        online=record.online,
        simulated=record.simulated,
        score=score.total,
        score_breakdown=score.breakdown,
        hardware_summary=hardware_summary(record.hardware),
        hardware=record.hardware.model_dump(exclude_none=True) if record.hardware is not None else {},
        model=record.current_model,
        model_state=model_state.state if model_state is not None else None,
        model_progress=model_state.progress if model_state is not None else None,
        model_error=model_state.error if model_state is not None else None,
        local_models=list(model_state.local_models) if model_state is not None else [],
        jobs_running=telemetry.jobs_running if telemetry is not None else 0,
        jobs_queued=telemetry.jobs_queued if telemetry is not None else 0,
        max_parallel=record.max_parallel,
        tokens_per_s=(speed.tokens_per_s if speed and speed.tokens_per_s else
                      telemetry.tokens_per_s if telemetry is not None else None),
        ttft_s=(speed.ttft_s if speed and speed.ttft_s is not None else
                telemetry.ttft_s if telemetry is not None else None),
        cpu_percent=telemetry.cpu_percent if telemetry is not None else None,
        ram_free_gb=telemetry.ram_free_gb if telemetry is not None else None,
        vram_free_gb=telemetry.vram_free_gb if telemetry is not None else None,
        backend=status.backend if status is not None else None,
        backend_reachable=(telemetry.backend_reachable if telemetry is not None and
                           telemetry.backend_reachable is not None else
                           status.backend_reachable if status is not None else None),
        backend_error=status.backend_error if status is not None else None,
        backend_url=status.backend_url if status is not None else None,
        last_seen_s=round(record.silent_for(now), 1),
        placement_reason=reason,
        cooling_down=cooling_down,
        runtime=record.runtime.model_dump() if record.runtime is not None else {},
        slots=record.slots if record.status is not None else None,
        loaded_models=list(record.loaded_models),
        available_models={offer.name: offer.state for offer in record.offers()},
        can_pull=record.can_pull,
        continues_prefill=record.continues_prefill,
    )


def hardware_summary(hardware: Hardware | None) -> str:
    """One line for the cluster table, e.g. ``Ryzen 9 7950X · 16 cores · 64 GB RAM · RTX 4090 24 GB``."""
    if hardware is None:
        return "hardware not reported"
    parts = []
    if hardware.cpu_brand:
        parts.append(hardware.cpu_brand)
    if hardware.cpu_physical_cores:
        clock = f" @ {hardware.cpu_max_ghz:g} GHz" if hardware.cpu_max_ghz else ""
        parts.append(f"{hardware.cpu_physical_cores} cores{clock}")
    if hardware.ram_total_gb:
        parts.append(f"{hardware.ram_total_gb:g} GB RAM")
    for gpu in hardware.gpus:
        parts.append(f"{gpu.name} {gpu.vram_total_gb:g} GB" if gpu.vram_total_gb else gpu.name)
    if not parts:
        return "hardware unknown"
    return " · ".join(parts) + (" (declared)" if hardware.declared else "")

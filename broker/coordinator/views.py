"""What the cluster view and the HTTP API show: pure functions of the registry, the last plan and the time.

Nothing here changes state, so :meth:`Coordinator.snapshot` may be called from
any thread, as often as the UI likes. What agents say goes in bounded (issue
13.6): a snapshot of N agents stays within N × a few tens of kB however much an
agent publishes, so ``/status`` stays cheap to build and to serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from broker.coordinator.contract import AgentView, ClusterSnapshot
from broker.protocol import Hardware
from broker.scheduling.availability import model_availability
from broker.scheduling.catalog import Catalog
from broker.scheduling.estimates import agent_score
from broker.scheduling.placement import Plan
from broker.scheduling.registry import AgentRecord, ClusterState
from broker.scheduling.trust import Standing

MAX_VIEW_MODELS = 24
"""Entries kept of each of an agent's model lists (local, loaded, available); the ``*_total`` fields count all."""
MAX_VIEW_NAME = 120
"""Characters kept of a model name in a view (real ones are far shorter; the protocol allows 200)."""
MAX_VIEW_TEXT = 500
"""Characters kept of an agent's error texts and of a placement reason."""
MAX_VIEW_SUMMARY = 300
MAX_SNAPSHOT_MODELS = 100
"""Servable models a snapshot lists (``ClusterSnapshot.models_total`` counts them all)."""
_NO_STANDING = Standing()


def cluster_snapshot(state: ClusterState, plan: Plan | None, catalog: Catalog, *, cooling: Mapping[str, bool],
                     connected: bool, now: float, generated_at: float,
                     standings: Mapping[str, Standing] | None = None) -> ClusterSnapshot:
    """The cluster at ``now`` (monotonic); ``cooling``: the agents the circuit breaker keeps idle; ``standings``:
    strikes and quarantines (agents in quarantine serve no model)."""
    standings = standings or {}
    reasons = placement_reasons(plan)
    placed = placed_scores(plan)
    views = [agent_view(record, catalog, reason=reasons.get(record.agent_id, ""),
                        cooling_down=cooling.get(record.agent_id, False), now=now,
                        standing=standings.get(record.agent_id, _NO_STANDING),
                        placed_score=placed.get(record.agent_id))
             for record in sorted(state.agents.values(), key=lambda r: r.agent_id)]
    held = {agent_id for agent_id, standing in standings.items() if standing.quarantined}
    models = model_availability(state, catalog, held)
    ready = sorted({model for record in state.agents.values()
                    if record.agent_id not in held and (model := record.ready_model)})
    return ClusterSnapshot(agents=views, ready_models=ready, connected=connected,
                           generated_at=generated_at,
                           servable_models=[model.name for model in models[:MAX_SNAPSHOT_MODELS]],
                           models=models[:MAX_SNAPSHOT_MODELS], models_total=len(models))


def cut(text: str | None, limit: int = MAX_VIEW_TEXT) -> str | None:
    """``text`` at most ``limit`` characters long (an ellipsis marks the cut)."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def first_names(names: Iterable[str]) -> list[str]:
    return [cut(name, MAX_VIEW_NAME) or "" for _, name in zip(range(MAX_VIEW_MODELS), names, strict=False)]


def placement_reasons(plan: Plan | None) -> dict[str, str]:
    """Why each agent got its model (or was excluded) in the last applied plan."""
    if plan is None:
        return {}
    reasons = {entry.agent_id: entry.reason for entry in plan.entries}
    reasons.update(plan.excluded)
    return reasons


def placed_scores(plan: Plan | None) -> dict[str, float]:
    """The score each agent had when the last applied plan placed it (its reason quotes that score)."""
    return {entry.agent_id: entry.score for entry in plan.entries} if plan is not None else {}


def with_current_score(reason: str, placed_score: float | None, score: float) -> str:
    """A placement reason that quotes an older score says so, with the score now (the table shows the score now,
    with the same rounding, so the two never silently disagree)."""
    if not reason or placed_score is None or f"{placed_score:.1f}" == f"{score:.1f}":
        return reason
    return f"{reason} (score {placed_score:.1f} when placed; {score:.1f} now)"


def agent_view(record: AgentRecord, catalog: Catalog, *, reason: str, cooling_down: bool, now: float,
               standing: Standing = _NO_STANDING, placed_score: float | None = None) -> AgentView:
    """One agent as the cluster table shows it; measured speeds win over what telemetry claims; every list and
    text that comes from the agent is bounded.

    An offline agent runs nothing and serves nothing: its jobs, model state and live load (the last telemetry
    it sent) are cleared rather than shown as if current; its model, hardware and measured speed stay.
    """
    score = agent_score(record, catalog)
    online = record.online
    telemetry, status, model_state = record.telemetry if online else None, record.status, record.model_state
    live_model_state = model_state if online else None
    speed = record.observed.get(record.ready_model or "") if record.ready_model else None
    measured = speed is not None and bool(speed.tokens_per_s)
    claimed = record.telemetry.tokens_per_s if record.telemetry is not None else None
    local = model_state.local_models if model_state is not None else []
    loaded = record.loaded_models
    offers = record.offers()
    return AgentView(
        id=record.agent_id,
        online=record.online,
        simulated=record.simulated,
        score=score.total,
        score_breakdown=score.breakdown,
        hardware_summary=cut(hardware_summary(record.hardware), MAX_VIEW_SUMMARY) or "",
        hardware=record.hardware.model_dump(exclude_none=True) if record.hardware is not None else {},
        model=cut(record.current_model, MAX_VIEW_NAME),
        model_state=live_model_state.state if live_model_state is not None else None,
        model_progress=live_model_state.progress if live_model_state is not None else None,
        model_error=cut(live_model_state.error) if live_model_state is not None else None,
        local_models=first_names(local),
        jobs_running=telemetry.jobs_running if telemetry is not None else 0,
        jobs_queued=telemetry.jobs_queued if telemetry is not None else 0,
        max_parallel=record.max_parallel,
        tokens_per_s=speed.tokens_per_s if measured and speed is not None else claimed,
        ttft_s=(speed.ttft_s if speed and speed.ttft_s is not None else
                record.telemetry.ttft_s if record.telemetry is not None else None),
        cpu_percent=telemetry.cpu_percent if telemetry is not None else None,
        ram_free_gb=telemetry.ram_free_gb if telemetry is not None else None,
        vram_free_gb=telemetry.vram_free_gb if telemetry is not None else None,
        backend=status.backend if status is not None else None,
        backend_reachable=(telemetry.backend_reachable if telemetry is not None and
                           telemetry.backend_reachable is not None else
                           status.backend_reachable if status is not None else None),
        backend_error=cut(status.backend_error) if status is not None else None,
        backend_url=cut(status.backend_url) if status is not None else None,
        last_seen_s=round(record.silent_for(now), 1),
        placement_reason=cut(with_current_score(reason, placed_score, score.total)) or "",
        cooling_down=cooling_down,
        runtime=record.runtime.model_dump() if record.runtime is not None else {},
        slots=record.slots if record.status is not None else None,
        loaded_models=first_names(loaded),
        available_models={cut(offer.name, MAX_VIEW_NAME) or "": offer.state for offer in offers[:MAX_VIEW_MODELS]},
        can_pull=record.can_pull,
        continues_prefill=record.continues_prefill,
        local_models_total=len(local),
        loaded_models_total=len(loaded),
        available_models_total=len(offers),
        claimed_slots=record.claimed_slots if record.status is not None and record.claimed_slots > record.slots
        else None,
        speed_source="measured" if measured else ("claimed" if claimed else None),
        strikes=standing.strikes,
        last_strike=standing.last_strike,
        quarantined=standing.quarantined,
        quarantine_reason=standing.reason,
        quarantine_left_s=standing.left_s,
        quarantines=standing.quarantines,
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

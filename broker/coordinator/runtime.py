"""The coordinator: registry from MQTT, placement on a schedule, routing, fan-out and failover.

The web app (and ``python -m broker``) use only this class. Everything runs on
one asyncio event loop: MQTT callbacks arrive through ``call_soon_threadsafe``,
the registry is an immutable value replaced on every event (so
:meth:`Coordinator.snapshot` and :meth:`Coordinator.plan` may be called from
any thread), and each query runs as a task that feeds the caller's async
generator through a queue — closing the generator cancels the task, and the
task's cleanup sends ``Cancel`` to every agent still working for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from broker.coordinator.attempts import Attempt
from broker.coordinator.contract import (
    ROUTING_MODES,
    AgentAnswer,
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    AgentView,
    ClusterSnapshot,
    PlanView,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.metrics import CoordinatorMetrics, mode_label
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage, MqttConnection, OutboundMessage, unique_client_id
from broker.protocol import (
    MAX_PAYLOAD_BYTES,
    Assign,
    Cancel,
    ChatMessage,
    CoordinatorStatus,
    Hardware,
    Job,
    ModelState,
    PayloadError,
    Result,
    ResultStats,
    Status,
    Telemetry,
    TopicKind,
    Topics,
    decode,
    encode,
    is_valid_agent_id,
)
from broker.scheduling import aggregation
from broker.scheduling.catalog import Catalog, load_catalog
from broker.scheduling.estimates import agent_score
from broker.scheduling.placement import PlacementSettings, Plan, plan_placement
from broker.scheduling.registry import (
    AgentExpired,
    AgentRecord,
    AnswerMeasured,
    AssignmentSeen,
    ClusterState,
    Event,
    HardwareReceived,
    ModelStateReceived,
    StatusReceived,
    TelemetryReceived,
    apply,
    find_expired,
)
from broker.scheduling.routing import (
    CircuitBreaker,
    Route,
    RouteCandidate,
    Router,
    largest_model,
    one_per_agent,
    route_candidates,
)

logger = logging.getLogger(__name__)

COORDINATOR_VERSION = "0.1.0"
HOUSEKEEPING_S = 0.5
OUTPUT_TOKENS_SMOOTHING = 0.1
NOT_THE_AGENTS_FAULT = {"bad_job", "context_too_long"}
"""Error codes that another agent would hit too: the query fails at once."""


class QueryError(Exception):
    """Ends a query with :class:`QueryFailed`."""

    def __init__(self, code: str, message: str, partial_text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial_text = partial_text


@dataclass
class _Run:
    """One query in progress."""

    request: QueryRequest
    started_at: float
    deadline: float
    emit: Callable[[QueryEvent], None]
    inbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    attempts: dict[str, Attempt] = field(default_factory=dict)
    counter: int = 0
    first_text_at: float | None = None
    cancel_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def next_wire_id(self) -> str:
        self.counter += 1
        return f"{self.request_id[:48]}.{self.counter}"

    def text_arrived(self, now: float) -> None:
        if self.first_text_at is None:
            self.first_text_at = now


@dataclass
class _Answer:
    text: str
    agents: list[str]
    models: list[str]
    stats: ResultStats | None
    failovers: int


class Coordinator:
    """Registry, placement, routing, fan-out and failover over MQTT; see docs/scheduling.md."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.catalog: Catalog = load_catalog(settings.catalog_path)
        self.topics = Topics(settings.topic_prefix)
        self.metrics = CoordinatorMetrics()
        self._chunks_ok = self.metrics.chunks.labels("ok")  # per-chunk hot path: skip the label lookup
        self.placement_settings = PlacementSettings(
            hysteresis=settings.placement_hysteresis,
            headroom_gb=settings.placement_headroom_gb,
            move_fraction=settings.placement_move_fraction,
            mix=settings.placement_mix,
            failed_retry_s=settings.failed_model_retry_s,
        )
        self._state = ClusterState()
        self._router = Router(settings.routing_policy)
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.cooldown_s)
        self._live: dict[str, tuple[_Run, Attempt]] = {}
        self._inflight: dict[str, int] = {}
        self._external: dict[str, int] = {}
        self._runs: dict[str, _Run] = {}
        self._output_tokens = float(settings.expected_output_tokens)
        self._last_plan: Plan | None = None
        self._connection: MqttConnection | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._replan_handle: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()  # replaced on every notify; binds to a loop only when awaited
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listening_since: float | None = None  # monotonic time of the last (re)connect; None while offline

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the broker (in the background, reconnecting forever) and start the schedule."""
        if self._loop is not None:
            raise RuntimeError("coordinator already started")
        self._loop = asyncio.get_running_loop()
        status_topic = self.topics.coordinator_status()
        self._connection = MqttConnection(
            self.settings,
            unique_client_id("coordinator", self.settings.coordinator_id),
            on_message=self._on_message,
            subscriptions=[(self.topics.all_agents(), 1), (self.topics.all_controls_of(TopicKind.ASSIGN), 1)],
            will=OutboundMessage.of(status_topic, CoordinatorStatus(state="offline",
                                                                    coordinator_version=COORDINATOR_VERSION)),
            birth=lambda: OutboundMessage.of(status_topic, CoordinatorStatus(state="online",
                                                                             coordinator_version=COORDINATOR_VERSION)),
            on_ready=self._on_connected,
            on_disconnected=self._on_disconnected,
            loop=self._loop,
        )
        self._connection.start()
        self._scheduler = AsyncIOScheduler(event_loop=self._loop)
        self._scheduler.add_job(self._scheduled_replan, "interval", seconds=self.settings.replan_interval_s,
                                id="replan", coalesce=True, max_instances=1)
        self._scheduler.start()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="coordinator-housekeeping")
        logger.info("coordinator %s started: broker %s, prefix %s, catalog %s (%d models), routing %s, "
                    "re-plan every %gs", self.settings.coordinator_id, self.settings.broker, self.topics.prefix,
                    self.settings.catalog_path, len(self.catalog.models), self.settings.routing_policy,
                    self.settings.replan_interval_s)

    async def stop(self) -> None:
        """Cancel queries (and their jobs on the agents), stop the schedule, publish offline, disconnect."""
        for run in list(self._runs.values()):
            run.cancel_reason = "coordinator stopping"
            run.inbox.put_nowait(("cancel", run.cancel_reason))
        self._notify()
        if self._tasks:  # let queries end with QueryFailed(cancelled) and cancel their jobs
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._replan_handle is not None:
            self._replan_handle.cancel()
            self._replan_handle = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        if self._connection is not None:
            final = OutboundMessage.of(self.topics.coordinator_status(),
                                       CoordinatorStatus(state="offline", coordinator_version=COORDINATOR_VERSION))
            connection, self._connection = self._connection, None
            await asyncio.get_running_loop().run_in_executor(None, connection.stop, final)
        self._loop = None
        logger.info("coordinator %s stopped", self.settings.coordinator_id)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected

    async def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until subscribed (retained state then arrives within moments)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected:
                return True
            await asyncio.sleep(0.02)
        return self.connected

    # ------------------------------------------------------------------ inbound MQTT (event loop)

    def _on_message(self, message: InboundMessage) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        kind, agent_id = parsed
        if agent_id is None:
            return
        if not message.payload and kind.spec.retained:
            self._on_cleared(kind, agent_id)
            return
        try:
            payload = decode(kind.spec.model, message.payload, topic=message.topic)
        except PayloadError as error:
            logger.warning("dropped %s", error)
            if kind is TopicKind.RESULT:
                self.metrics.chunks.labels("invalid").inc()
            return
        if isinstance(payload, Result):
            self._on_result(agent_id, payload)
        elif isinstance(payload, Telemetry):
            self._apply(TelemetryReceived(agent_id, payload))
            own = self._inflight.get(agent_id, 0)
            self._external[agent_id] = max(0, payload.jobs_running + payload.jobs_queued - own)
            self._notify()
        elif isinstance(payload, Status):
            self._apply(StatusReceived(agent_id, payload))
        elif isinstance(payload, Hardware):
            self._apply(HardwareReceived(agent_id, payload))
        elif isinstance(payload, ModelState):
            self._apply(ModelStateReceived(agent_id, payload))
        elif isinstance(payload, Assign):
            self._apply(AssignmentSeen(agent_id, payload))

    def _on_connected(self) -> None:
        """After every (re)connect: silence is judged from now on, and the retained assignments go back.

        A broker restarted without its persistence file (SIGKILL, a new machine) has forgotten the
        assignments, and an agent that restarts afterwards would wait for its model forever. The payload is
        the one published before (same assignment id), so agents that still have it treat it as a no-op.
        """
        self._listening_since = time.monotonic()
        if self._connection is None:
            return
        for record in list(self._state.agents.values()):
            if record.assignment is not None:
                self._connection.publish(self.topics.assign(record.agent_id), record.assignment, qos=1, retain=True)

    def _on_disconnected(self) -> None:
        """While we cannot hear anyone, nobody's silence means anything (see :meth:`_housekeep`)."""
        self._listening_since = None

    def _on_cleared(self, kind: TopicKind, agent_id: str) -> None:
        event: Event | None = {
            TopicKind.STATUS: StatusReceived(agent_id, None),
            TopicKind.HARDWARE: HardwareReceived(agent_id, None),
            TopicKind.MODEL: ModelStateReceived(agent_id, None),
            TopicKind.ASSIGN: AssignmentSeen(agent_id, None),
        }.get(kind)
        if event is not None:
            self._apply(event)

    def _apply(self, event: Event) -> None:
        """Advance the registry and react to what changed: joins, leaves, models becoming ready."""
        before = self._state.agents.get(event.agent_id)
        self._state = apply(self._state, event, time.monotonic())
        after = self._state.agents.get(event.agent_id)
        was_online = before is not None and before.online
        is_online = after is not None and after.online
        if is_online and not was_online:
            logger.info("agent %s joined%s", event.agent_id, " (simulated)" if after and after.simulated else "")
            self._schedule_replan("agent_joined")
        elif was_online and not is_online:
            why = "telemetry stopped" if isinstance(event, AgentExpired) else "offline"
            logger.warning("agent %s left (%s)", event.agent_id, why)
            self._agent_gone(event.agent_id, f"agent {event.agent_id} went away ({why})")
            self._schedule_replan("agent_left")
        elif isinstance(event, HardwareReceived) and is_online and (before is None or before.hardware is None):
            self._schedule_replan("hardware")
        ready_before = before.ready_model if before is not None else None
        ready_after = after.ready_model if after is not None else None
        if ready_before != ready_after:
            logger.info("agent %s: ready model %s → %s", event.agent_id, ready_before, ready_after)
            if self._last_plan is not None and self._last_plan.deferred and ready_after is not None:
                self._schedule_replan("deferred")
            self._notify()

    def _on_result(self, agent_id: str, result: Result) -> None:
        entry = self._live.get(result.request_id)
        if entry is None:
            self.metrics.chunks.labels("late").inc()
            return
        run, attempt = entry
        if attempt.agent_id != agent_id:
            logger.warning("ignored result for %s from %s: the job went to %s", result.request_id, agent_id,
                           attempt.agent_id)
            self.metrics.chunks.labels("wrong_agent").inc()
            return
        self._chunks_ok.inc()
        run.inbox.put_nowait(("result", result))

    def _agent_gone(self, agent_id: str, reason: str) -> None:
        for run, attempt in list(self._live.values()):
            if attempt.agent_id == agent_id:
                run.inbox.put_nowait(("gone", (attempt.wire_id, reason)))

    def _notify(self) -> None:
        """Wake queries waiting for capacity or for a model to become ready."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def _housekeep(self) -> None:
        """Expire silent agents (an explicit, logged event) and refresh gauges.

        Only silence while we were listening counts: during our own broker outage every agent is silent, and
        expiring them all used to fail every running query although the agents kept answering (found by
        tests/test_faults_broker.py). After a reconnect an agent gets a full expiry period to speak again.
        """
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                now = time.monotonic()
                listening_since = self._listening_since
                for expired in find_expired(self._state, now, self.settings.expiry_factor):
                    if listening_since is None or now - listening_since < expired.limit_s:
                        continue
                    logger.warning("agent %s expired: no telemetry for %.1f s (limit %.1f s)", expired.agent_id,
                                   expired.silent_s, expired.limit_s)
                    self.metrics.agent_expiries.inc()
                    self._apply(expired)
                online = self._state.online_agents()
                self.metrics.agents_online.set(len(online))
                self.metrics.agents_ready.set(sum(1 for record in online if record.ready_model))
            except Exception:  # noqa: BLE001 - housekeeping must survive a bug in one round
                logger.exception("housekeeping failed")

    # ------------------------------------------------------------------ placement

    def _compute_plan(self) -> Plan:
        return plan_placement(self._state, self.catalog, self.placement_settings, time.monotonic(), time.time())

    def plan(self) -> PlanView:
        """What a re-plan would do now, without doing it (what-if)."""
        return self._compute_plan().view(applied=False)

    async def reassign(self) -> PlanView:
        """Re-plan now and publish the changes."""
        return self._replan("on_demand").view(applied=True)

    def _replan(self, trigger: str) -> Plan:
        plan = self._compute_plan()
        self._last_plan = plan
        self.metrics.replans.labels(trigger).inc()
        for entry in plan.changes:
            assign = Assign(model=entry.target_model, assignment_id=uuid.uuid4().hex[:16], reason=entry.reason)
            if self._connection is not None:
                self._connection.publish(self.topics.assign(entry.agent_id), assign, qos=1, retain=True)
            self._apply(AssignmentSeen(entry.agent_id, assign))
            self.metrics.assignments.inc()
            logger.info("assign %s → %s (was %s): %s", entry.agent_id, entry.target_model, entry.current_model,
                        entry.reason)
        for entry in plan.deferred:
            logger.info("deferred %s → %s: %s", entry.agent_id, entry.target_model, entry.reason)
        if not plan.changes:
            logger.debug("re-plan (%s): no changes", trigger)
        else:
            logger.info("re-plan (%s): %d change(s), %d deferred", trigger, len(plan.changes), len(plan.deferred))
        return plan

    async def _scheduled_replan(self) -> None:
        try:
            self._replan("schedule")
        except Exception:  # noqa: BLE001 - the schedule must keep running
            logger.exception("scheduled re-plan failed")

    def _schedule_replan(self, trigger: str) -> None:
        """Debounced: several joins and leaves in a row give one plan."""
        if self._loop is None or self._replan_handle is not None:
            return

        def run() -> None:
            self._replan_handle = None
            try:
                self._replan(trigger)
            except Exception:  # noqa: BLE001
                logger.exception("re-plan after %s failed", trigger)

        self._replan_handle = self._loop.call_later(self.settings.replan_debounce_s, run)

    # ------------------------------------------------------------------ views

    def snapshot(self) -> ClusterSnapshot:
        """The cluster now; safe from any thread (the registry is immutable)."""
        state = self._state
        plan = self._last_plan
        reasons = {entry.agent_id: entry.reason for entry in plan.entries} if plan is not None else {}
        if plan is not None:
            reasons.update(plan.excluded)
        now = time.monotonic()
        views = [self._agent_view(record, reasons.get(record.agent_id, ""), now)
                 for record in sorted(state.agents.values(), key=lambda r: r.agent_id)]
        return ClusterSnapshot(agents=views, ready_models=state.ready_models(), connected=self.connected,
                               generated_at=time.time())

    def _agent_view(self, record: AgentRecord, reason: str, now: float) -> AgentView:
        score = agent_score(record, self.catalog)
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
            last_seen_s=round(record.silent_for(now), 1),
            placement_reason=reason,
            cooling_down=self._breaker.cooling_down(record.agent_id, now),
        )

    def model_names(self) -> list[str]:
        """Models ready somewhere in the cluster."""
        return self._state.ready_models()

    # ------------------------------------------------------------------ queries

    async def query(self, request: QueryRequest) -> AsyncIterator[QueryEvent]:
        """Answer ``request`` as a stream of events ending with QueryFinished or QueryFailed.

        Closing the generator early (``aclose()``) cancels the query and its jobs on the agents.
        """
        out: asyncio.Queue[QueryEvent | None] = asyncio.Queue()

        async def produce() -> None:
            try:
                await self._execute(request, out.put_nowait)
            finally:
                out.put_nowait(None)  # end of stream, also when stop() cancels the query

        task = asyncio.create_task(produce(), name=f"query-{request.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            while (event := await out.get()) is not None:
                yield event
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

    async def cancel(self, request_id: str) -> bool:
        """Cancel a running query; its stream ends with QueryFailed(code="cancelled")."""
        run = self._runs.get(request_id)
        if run is None:
            return False
        run.cancel_reason = "cancelled by the caller"
        run.inbox.put_nowait(("cancel", run.cancel_reason))
        self._notify()
        return True

    async def _execute(self, request: QueryRequest, emit: Callable[[QueryEvent], None]) -> None:
        now = time.monotonic()
        mode = request.mode or "auto"
        label = mode_label(mode)
        problem = self._validate(request)
        if problem is not None:
            self._fail_metrics(label, "bad_request")
            emit(QueryFailed(request.request_id, problem, code="bad_request"))
            return
        timeout = request.timeout_s if request.timeout_s and request.timeout_s > 0 else self.settings.default_deadline_s
        run = _Run(request, now, now + timeout, emit)
        self._runs[request.request_id] = run
        try:
            if mode == "all":
                emit(await self._fan_out(run))
            else:
                answer = await self._answer(run, list(request.messages), mode, announce=True)
                latency = time.monotonic() - run.started_at
                emit(QueryFinished(request.request_id, answer.text, answer.agents, answer.models, mode,
                                   stats=answer.stats, failovers=answer.failovers, latency_s=round(latency, 3)))
            self._finish_metrics(run, label)
        except QueryError as error:
            self._fail_metrics(label, error.code)
            emit(QueryFailed(request.request_id, error.message, code=error.code,  # type: ignore[arg-type]
                             partial_text=error.partial_text))
        except asyncio.CancelledError:
            self.metrics.queries.labels(label, "cancelled").inc()
            raise
        except Exception as error:  # noqa: BLE001 - a bug must end the stream with an error, not silently
            logger.exception("query %s failed unexpectedly", request.request_id)
            self._fail_metrics(label, "failed")
            emit(QueryFailed(request.request_id, f"internal error: {error}", code="failed"))
        finally:
            self._runs.pop(request.request_id, None)
            for attempt in list(run.attempts.values()):
                self._end_attempt(attempt, cancel_reason="query ended")

    def _validate(self, request: QueryRequest) -> str | None:
        if not request.messages:
            return "a query needs at least one message"
        if not is_valid_agent_id(request.request_id):
            return "request_id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
        if request.request_id in self._runs:
            return f"request {request.request_id} is already running"
        if request.aggregation not in ("consensus", "synthesize", "first"):
            return f"unknown aggregation {request.aggregation!r} (consensus, synthesize or first)"
        size = sum(len(message.content) for message in request.messages)
        if size > MAX_PAYLOAD_BYTES * 0.9:
            return f"the conversation is too large ({size} characters; the limit is about {MAX_PAYLOAD_BYTES:,} bytes)"
        return None

    def _finish_metrics(self, run: _Run, label: str) -> None:
        now = time.monotonic()
        self.metrics.queries.labels(label, "ok").inc()
        self.metrics.latency.labels(label).observe(now - run.started_at)
        if run.first_text_at is not None:
            self.metrics.ttft.labels(label).observe(run.first_text_at - run.started_at)

    def _fail_metrics(self, label: str, code: str) -> None:
        self.metrics.queries.labels(label, "cancelled" if code == "cancelled" else "error").inc()
        self.metrics.errors.labels(code).inc()

    # ------------------------------------------------------------------ single route with failover

    def _expected_output_tokens(self, request: QueryRequest) -> float:
        limit = request.options.get("num_predict") or request.options.get("max_tokens")
        if isinstance(limit, (int, float)) and limit > 0:
            return min(float(limit), self._output_tokens)
        return self._output_tokens

    def _candidates(self, model: str | None, exclude: frozenset[str], request: QueryRequest) -> list[RouteCandidate]:
        prompt_tokens = sum(len(message.content) for message in request.messages) // 4
        return route_candidates(
            self._state, self.catalog, model=model, own_inflight=self._inflight, external=self._external,
            cooling=self._breaker.cooling(time.monotonic()), exclude=exclude, prompt_tokens=prompt_tokens,
        )

    def _has_room(self, candidate: RouteCandidate) -> bool:
        return candidate.outstanding < candidate.slots + self.settings.agent_queue_limit

    async def _admit(self, run: _Run, mode: str, exclude: frozenset[str], prefer_model: str | None) -> Route:
        """Choose an agent, waiting (bounded) for room or for a model that is still loading."""
        named = mode not in ROUTING_MODES
        wanted = mode if named else None
        give_up = min(run.deadline, time.monotonic() + self.settings.admission_wait_s)
        while True:
            wake = self._wake
            if run.cancel_reason:
                raise QueryError("cancelled", run.cancel_reason)
            candidates = self._candidates(wanted, exclude, run.request)
            if prefer_model is not None and any(c.model == prefer_model for c in candidates):
                candidates = [c for c in candidates if c.model == prefer_model]
            elif mode == "quality" and candidates:
                biggest = largest_model(candidates, self.catalog)
                candidates = [c for c in candidates if c.model == biggest]
            open_ = [c for c in candidates if self._has_room(c)]
            if open_:
                return self._router.choose(open_, self._expected_output_tokens(run.request))
            waiting_for = None if candidates else self._coming(wanted, exclude)
            now = time.monotonic()
            if not candidates and waiting_for is None:
                raise QueryError("no_agent" if not exclude else "failed",
                                 self._no_agent_message(wanted, exclude), partial_text="")
            if now >= give_up:
                if candidates:
                    load = sum(c.outstanding for c in candidates)
                    room = sum(c.slots + self.settings.agent_queue_limit for c in candidates)
                    raise QueryError("busy", (
                        f"cluster busy: all {len(candidates)} agent(s) that can serve "
                        f"{wanted or 'this query'} are full ({load} jobs for {room} places); "
                        f"waited {self.settings.admission_wait_s:g} s — try again shortly"))
                raise QueryError("no_agent", f"no agent can serve this yet: {waiting_for}; "
                                             f"waited {self.settings.admission_wait_s:g} s")
            await _wait_for_event(wake, give_up - now)

    def _coming(self, model: str | None, exclude: frozenset[str]) -> str | None:
        """Describe an agent that will soon be able to serve (pulling, loading, just assigned), or ``None``."""
        for record in self._state.online_agents():
            target = record.current_model
            if record.agent_id in exclude or (model is not None and target != model):
                continue
            state = record.model_state
            if state is not None and state.state in ("pulling", "loading"):
                progress = f" {state.progress:.0%}" if state.progress is not None else ""
                return f"{record.agent_id} is {state.state} {state.model or target}{progress}"
            if record.assignment is not None and (state is None or state.state == "absent"
                                                  or state.model != record.assignment.model):
                return f"{record.agent_id} was just assigned {record.assignment.model}"
            if record.assignment is None and self._replan_handle is not None:
                return f"{record.agent_id} is waiting for its model assignment"
        return None

    def _no_agent_message(self, model: str | None, exclude: frozenset[str]) -> str:
        state = self._state
        online = state.online_agents()
        if exclude:
            return f"no other agent can continue this answer (tried {', '.join(sorted(exclude))})"
        if not online:
            return "no agent can serve this: no agent is online"
        ready = state.ready_models()
        if model is not None:
            known = " (it is in the catalog but no agent is assigned it)" if self.catalog.model(model) else ""
            available = f"; ready models: {', '.join(ready)}" if ready else ""
            return f"no agent can serve model {model!r}: it is not ready on any agent{known}{available}"
        problems = "; ".join(
            f"{record.agent_id}: {record.model_state.state if record.model_state else 'no model'}"
            + (f" ({record.model_state.error})" if record.model_state and record.model_state.error else "")
            for record in online
        )
        return f"no agent can serve this: no agent has a ready model ({problems})"

    async def _answer(self, run: _Run, messages: list[ChatMessage], mode: str, *, announce: bool) -> _Answer:
        """One answer from one agent at a time; on failure, another continues from the partial text."""
        exclude: set[str] = set()
        partial = ""
        attempts: list[Attempt] = []
        reasons: list[str] = []
        while True:
            previous = attempts[-1] if attempts else None
            try:
                route = await self._admit(run, mode, frozenset(exclude), previous.model if previous else None)
            except QueryError as error:
                if previous is not None and error.code in ("no_agent", "failed", "busy"):
                    raise QueryError("failed", f"{'; '.join(reasons)}; and {error.message}",
                                     partial_text=partial) from None
                error.partial_text = partial
                raise
            attempt = self._send(run, route.candidate, messages, partial)
            attempts.append(attempt)
            if previous is not None:
                run.emit(AgentSwitched(run.request_id, previous.agent_id, attempt.agent_id, attempt.model,
                                       reasons[-1]))
            elif announce:
                run.emit(QueryStarted(run.request_id, [attempt.agent_id], [attempt.model], run.request.mode,
                                      route.reason))
            problem = await self._follow(run, attempt, lambda text, a=attempt: run.emit(
                TextDelta(run.request_id, text, a.agent_id, a.model)))
            partial += attempt.text
            if problem is None and attempt.error is None:
                return _Answer(partial, [a.agent_id for a in attempts], [a.model for a in attempts],
                               self._combined_stats(run, attempts), len(attempts) - 1)
            reason = problem or f"{attempt.error_code or 'error'}: {attempt.error}"
            if attempt.error_code in NOT_THE_AGENTS_FAULT:
                raise QueryError("bad_request" if attempt.error_code == "bad_job" else "failed",
                                 f"{attempt.agent_id} refused the job: {attempt.error}", partial_text=partial)
            if attempt.error_code != "busy" and self._breaker.record_failure(attempt.agent_id, time.monotonic()):
                logger.warning("agent %s cools down for %g s after %d failures in a row", attempt.agent_id,
                               self.settings.cooldown_s, self.settings.breaker_failures)
            exclude.add(attempt.agent_id)
            reasons.append(f"{attempt.agent_id}: {reason}")
            logger.warning("query %s: %s failed (%s) after %d chars", run.request_id, attempt.agent_id, reason,
                           len(attempt.text))
            if time.monotonic() >= run.deadline:
                raise QueryError("timeout", f"no complete answer within the deadline ({'; '.join(reasons)})",
                                 partial_text=partial)
            if len(attempts) > self.settings.max_failovers:
                raise QueryError("failed", f"gave up after {len(attempts)} attempt(s): {'; '.join(reasons)}",
                                 partial_text=partial)
            self.metrics.failovers.labels(_failure_kind(reason)).inc()

    @staticmethod
    def _combined_stats(run: _Run, attempts: list[Attempt]) -> ResultStats:
        """Stats of an answer that may span several agents: tokens add up, times are the caller's."""
        stats = [a.stats for a in attempts if a.stats is not None]
        outputs = [s.output_tokens for s in stats if s.output_tokens is not None]
        return ResultStats(
            prompt_tokens=next((s.prompt_tokens for s in stats if s.prompt_tokens is not None), None),
            output_tokens=sum(outputs) if outputs else None,
            ttft_s=round(run.first_text_at - run.started_at, 4) if run.first_text_at else None,
            tokens_per_s=attempts[-1].stats.tokens_per_s if attempts[-1].stats is not None else None,
            total_s=round(time.monotonic() - run.started_at, 4),
        )

    def _send(self, run: _Run, candidate: RouteCandidate, messages: list[ChatMessage], prefix: str) -> Attempt:
        now = time.monotonic()
        attempt_deadline = min(run.deadline, now + self.settings.attempt_deadline_s)
        wire_id = run.next_wire_id()
        job = Job(request_id=wire_id, model=candidate.model, messages=messages, options=dict(run.request.options),
                  deadline=time.time() + (attempt_deadline - now), assistant_prefix=prefix or None,
                  attempt=run.counter - 1)
        payload = encode(job)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise QueryError("bad_request", f"the job is {len(payload):,} bytes; the limit is {MAX_PAYLOAD_BYTES:,}")
        attempt = Attempt(wire_id, candidate.agent_id, candidate.model, now, attempt_deadline, prefix=prefix)
        run.attempts[wire_id] = attempt
        self._live[wire_id] = (run, attempt)
        self._inflight[candidate.agent_id] = self._inflight.get(candidate.agent_id, 0) + 1
        self.metrics.jobs_in_flight.inc()
        if self._connection is not None:
            self._connection.publish(self.topics.job(candidate.agent_id), payload, qos=1)
        logger.debug("job %s → %s (%s)%s", wire_id, candidate.agent_id, candidate.model,
                     f" continuing after {len(prefix)} chars" if prefix else "")
        return attempt

    def _end_attempt(self, attempt: Attempt, cancel_reason: str | None = None) -> None:
        """Forget an attempt; tell the agent to stop if it has not finished."""
        entry = self._live.pop(attempt.wire_id, None)
        if entry is None:
            return
        run, _ = entry
        run.attempts.pop(attempt.wire_id, None)
        count = self._inflight.get(attempt.agent_id, 1) - 1
        if count > 0:
            self._inflight[attempt.agent_id] = count
        else:
            self._inflight.pop(attempt.agent_id, None)
        self.metrics.jobs_in_flight.dec()
        if not attempt.done and cancel_reason is not None and self._connection is not None:
            self._connection.publish(self.topics.cancel(attempt.agent_id),
                                     Cancel(request_id=attempt.wire_id, reason=cancel_reason), qos=1)
        if attempt.done and attempt.error is None:
            self._breaker.record_success(attempt.agent_id)
            if attempt.stats is not None:
                self._apply(AnswerMeasured(attempt.agent_id, attempt.model, attempt.stats))
                if attempt.stats.output_tokens:
                    self.metrics.output_tokens.labels(attempt.model).inc(attempt.stats.output_tokens)
                    self._output_tokens += OUTPUT_TOKENS_SMOOTHING * (attempt.stats.output_tokens - self._output_tokens)
        self._notify()

    async def _next_signal(self, run: _Run, until: float) -> tuple[str, Any] | None:
        if not run.inbox.empty():
            return run.inbox.get_nowait()
        timeout = until - time.monotonic()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(run.inbox.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _follow(self, run: _Run, attempt: Attempt, on_text: Callable[[str], None]) -> str | None:
        """Stream one attempt to its end; return ``None`` when it finished, else why it failed."""
        first, between = self.settings.stall_first_token_s, self.settings.stall_between_chunks_s
        try:
            while True:
                now = time.monotonic()
                stalled = attempt.stall_reason(now, first, between)
                if stalled is not None:
                    return f"stalled: {stalled}"
                signal = await self._next_signal(run, attempt.next_check(first, between))
                if signal is None:
                    continue
                kind, value = signal
                if kind == "cancel":
                    raise QueryError("cancelled", str(value), partial_text=attempt.text)
                if kind == "gone" and value[0] == attempt.wire_id:
                    return str(value[1])
                if kind == "result" and value.request_id == attempt.wire_id:
                    text = attempt.accept(value, time.monotonic())
                    if text:
                        run.text_arrived(time.monotonic())
                        on_text(text)
                    if attempt.done:
                        return None
        finally:
            if not attempt.done:
                self._end_attempt(attempt, cancel_reason=run.cancel_reason or "abandoned by the coordinator")
            else:
                self._end_attempt(attempt)

    # ------------------------------------------------------------------ fan-out

    async def _fan_out(self, run: _Run) -> QueryFinished:
        request = run.request
        targets = await self._fan_out_targets(run)
        attempts = [self._send(run, candidate, list(request.messages), "") for candidate in targets]
        run.emit(QueryStarted(run.request_id, [a.agent_id for a in attempts], [a.model for a in attempts], "all",
                              f"fan-out to {len(attempts)} agent(s), then {request.aggregation}"))
        answers: dict[str, AgentAnswer] = {}
        simulated = {record.agent_id for record in self._state.agents.values() if record.simulated}
        first, between = self.settings.stall_first_token_s, self.settings.stall_between_chunks_s

        def finish(attempt: Attempt, error: str | None) -> None:
            answer = AgentAnswer(attempt.agent_id, attempt.model, attempt.text, attempt.stats, error,
                                 attempt.agent_id in simulated)
            answers[attempt.wire_id] = answer
            run.emit(AgentFinished(run.request_id, answer))
            cancel = None if attempt.done else (error or "fan-out ended")
            self._end_attempt(attempt, cancel_reason=cancel)

        winner: Attempt | None = None
        while len(answers) < len(attempts):
            now = time.monotonic()
            pending = [a for a in attempts if a.wire_id not in answers]
            if now >= run.deadline:
                for attempt in pending:
                    finish(attempt, f"no complete answer by the deadline ({now - run.started_at:.1f} s)")
                break
            for attempt in pending:
                stalled = attempt.stall_reason(now, first, between)
                if stalled is not None:
                    finish(attempt, f"stalled: {stalled}")
            pending = [a for a in attempts if a.wire_id not in answers]
            if not pending:
                break
            until = min([run.deadline] + [a.next_check(first, between) for a in pending])
            signal = await self._next_signal(run, until)
            if signal is None:
                continue
            kind, value = signal
            if kind == "cancel":
                raise QueryError("cancelled", str(value))
            if kind == "gone":
                attempt = run.attempts.get(value[0])
                if attempt is not None and attempt.wire_id not in answers:
                    finish(attempt, str(value[1]))
                continue
            attempt = run.attempts.get(value.request_id)
            if attempt is None or attempt.wire_id in answers:
                continue
            text = attempt.accept(value, time.monotonic())
            if text:
                run.text_arrived(time.monotonic())
                run.emit(AgentDelta(run.request_id, attempt.agent_id, attempt.model, text))
            if attempt.done:
                finish(attempt, f"{attempt.error_code or 'error'}: {attempt.error}" if attempt.error else None)
                if attempt.error is None and request.aggregation == "first" and winner is None:
                    winner = attempt
                    for other in [a for a in attempts if a.wire_id not in answers]:
                        finish(other, "cancelled: another answer came first")
        ordered = [answers[a.wire_id] for a in attempts]
        return await self._combine(run, ordered, winner)

    async def _fan_out_targets(self, run: _Run) -> list[RouteCandidate]:
        give_up = min(run.deadline, time.monotonic() + self.settings.admission_wait_s)
        while True:
            wake = self._wake
            candidates = one_per_agent(self._candidates(None, frozenset(), run.request))
            if candidates:
                return candidates
            coming = self._coming(None, frozenset())
            if coming is None:
                raise QueryError("no_agent", self._no_agent_message(None, frozenset()))
            now = time.monotonic()
            if now >= give_up:
                raise QueryError("no_agent", f"no agent can serve this yet: {coming}; "
                                             f"waited {self.settings.admission_wait_s:g} s")
            await _wait_for_event(wake, give_up - now)
            if run.cancel_reason:
                raise QueryError("cancelled", run.cancel_reason)

    async def _combine(self, run: _Run, answers: list[AgentAnswer], winner: Attempt | None) -> QueryFinished:
        request = run.request
        complete = [answer for answer in answers if answer.error is None and answer.text.strip()]
        latency = round(time.monotonic() - run.started_at, 3)
        agents = [answer.agent_id for answer in answers]
        models = [answer.model for answer in answers]
        if not complete:
            problems = "; ".join(f"{answer.agent_id}: {answer.error or 'empty answer'}" for answer in answers)
            raise QueryError("failed", f"no agent answered ({problems})",
                             partial_text=max((a.text for a in answers), key=len, default=""))
        agreement = aggregation.consensus([answer.text for answer in complete])
        text = complete[agreement.index].text
        combined_by = f"{complete[agreement.index].agent_id} / {complete[agreement.index].model} (consensus)"
        method = request.aggregation
        if method == "first" and winner is not None:
            first_answer = next(a for a in complete if a.agent_id == winner.agent_id)
            text, combined_by = first_answer.text, f"{first_answer.agent_id} / {first_answer.model} (first)"
        elif method == "synthesize":
            labelled = [(f"{a.agent_id} / {a.model}", a.text) for a in complete]
            messages = aggregation.synthesis_messages(request.messages, labelled)
            try:
                synthesis = await self._answer(run, messages, "quality", announce=False)
                text = synthesis.text
                combined_by = f"{synthesis.agents[-1]} / {synthesis.models[-1]} (synthesis)"
            except QueryError as error:
                if error.code == "cancelled":
                    raise
                logger.warning("query %s: synthesis failed (%s); using the consensus answer", run.request_id,
                               error.message)
                combined_by += f"; synthesis failed: {error.message}"
        return QueryFinished(run.request_id, text, agents, models, "all", answers=answers, aggregation=method,
                             agreement=agreement.agreement, latency_s=latency, combined_by=combined_by)


async def _wait_for_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set or ``timeout`` passes (cancel() and capacity changes set it)."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(0.01, timeout))


def _failure_kind(reason: str) -> str:
    for kind in ("stalled", "went away", "deadline", "busy"):
        if kind in reason:
            return kind.replace("went away", "offline")
    return "error"


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

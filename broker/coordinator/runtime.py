"""The coordinator: the registry fed from MQTT, placement on a schedule, and queries handed to the executor.

The web app (and ``python -m broker``) use only :class:`Coordinator`. It owns the
lifecycle (connect, schedule, housekeeping, stop), turns inbound MQTT messages
into registry events, expires silent agents, and re-plans; it composes

* :mod:`broker.scheduling` — the pure registry, placement and routing,
* :class:`~broker.coordinator.execution.QueryExecutor` — admission, failover, fan-out,
* :class:`~broker.coordinator.attempts.InFlight` — who works on what,
* :mod:`broker.coordinator.views` — the cluster snapshot,
* :class:`~broker.coordinator.wakeup.Wakeup` — wakes queries waiting for capacity.

Everything runs on one asyncio event loop: MQTT callbacks arrive through
``call_soon_threadsafe`` (see :mod:`broker.mqtt.client`), the registry is an
immutable value replaced on every event (so :meth:`Coordinator.snapshot` and
:meth:`Coordinator.plan` may be called from any thread), and each query runs as
a task that feeds the caller's async generator through a queue — closing the
generator cancels the task, and the task's cleanup sends ``Cancel`` to every
agent still working for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from broker.coordinator.attempts import InFlight
from broker.coordinator.contract import (
    ClusterSnapshot,
    LeadershipView,
    LoadedModel,
    ManageEvent,
    ModelAvailability,
    PlanView,
    QueryEvent,
    QueryRequest,
    new_request_id,
)
from broker.coordinator.embedding import EmbeddingAnswer, EmbeddingRunner
from broker.coordinator.execution import QueryExecutor
from broker.coordinator.leadership import Leadership, instance_id_for
from broker.coordinator.management import ModelOperations
from broker.coordinator.metrics import CoordinatorMetrics
from broker.coordinator.settings import CoordinatorSettings
from broker.coordinator.views import cluster_snapshot
from broker.coordinator.wakeup import Wakeup
from broker.mqtt.client import InboundMessage, MqttConnection, OutboundMessage, unique_client_id
from broker.protocol import (
    Assign,
    CoordinatorStatus,
    Hardware,
    Message,
    ModelState,
    Operation,
    PayloadError,
    Result,
    Status,
    Telemetry,
    TopicKind,
    Topics,
    decode,
)
from broker.scheduling import availability
from broker.scheduling.catalog import Catalog, load_catalog
from broker.scheduling.estimates import agent_score
from broker.scheduling.placement import PlacementSettings, Plan, plan_placement
from broker.scheduling.registry import (
    AgentExpired,
    AgentRecord,
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
from broker.scheduling.routing import CircuitBreaker
from broker.scheduling.trust import Trust

logger = logging.getLogger(__name__)

COORDINATOR_VERSION = "0.1.0"
HOUSEKEEPING_S = 0.5
ASSIGNMENT_RESEND_S = 5.0
"""An agent whose model state names no assignment gets ours again at most this often (see _recover_assignment)."""

_RETAINED_EVENTS: Mapping[type, Callable[[str, Any], Event]] = {
    Status: StatusReceived,
    Hardware: HardwareReceived,
    ModelState: ModelStateReceived,
    Assign: AssignmentSeen,
}
"""Retained message type → the registry event it becomes."""

_CLEARED_EVENTS: Mapping[TopicKind, Callable[[str, None], Event]] = {
    TopicKind.STATUS: StatusReceived,
    TopicKind.HARDWARE: HardwareReceived,
    TopicKind.MODEL: ModelStateReceived,
    TopicKind.ASSIGN: AssignmentSeen,
}
"""Retained topic cleared (empty payload) → the registry event that forgets it."""


class Coordinator:
    """Registry, placement, routing, fan-out and failover over MQTT; see docs/scheduling.md."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.instance_id = instance_id_for(settings.coordinator_id)  # unique per process: the leadership tie-break
        self._leadership: Leadership | None = None
        self.catalog: Catalog = load_catalog(settings.catalog_path, settings.catalog)
        self.topics = Topics(settings.topic_prefix)
        self.metrics = CoordinatorMetrics()
        self._chunks_ok = self.metrics.chunks.labels("ok")  # per-chunk hot path: skip the label lookup
        self.placement_settings = PlacementSettings(
            hysteresis=settings.placement_hysteresis,
            headroom_gb=settings.placement_headroom_gb,
            move_fraction=settings.placement_move_fraction,
            mix=settings.placement_mix,
            failed_retry_s=settings.failed_model_retry_s,
            extra_models=settings.placement_extra_models,
            embedding_model=settings.placement_embedding_model or None,
        )
        self._state = ClusterState()
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.cooldown_s)
        self._trust = Trust(settings.strike_limit, settings.strike_window_s, settings.quarantine_s,
                            settings.quarantine_max_s)
        self._ledger = InFlight()
        self._wakeup = Wakeup()
        self._execution = QueryExecutor(
            settings, self.catalog, self.topics, self.metrics,
            state=lambda: self._state,
            publish=self._publish,
            ledger=self._ledger,
            breaker=self._breaker,
            trust=self._trust,
            wakeup=self._wakeup,
            answer_measured=self._apply,
            assignment_pending=lambda: self._replan_handle is not None,
            settling=self._settle_left,
        )
        self._operations = ModelOperations(
            self.topics, self.metrics, publish=self._publish, state=lambda: self._state, catalog=self.catalog,
            plan=lambda: self._last_plan, quarantined=lambda: self._trust.quarantined(time.monotonic()),
            epoch=lambda: self.leader_epoch)
        self._embeddings = EmbeddingRunner(
            state=lambda: self._state, publish=self._publish, topics=self.topics,
            quarantined=lambda: self._trust.quarantined(time.monotonic()),
            batch_inputs=settings.embed_batch_inputs, timeout_s=settings.embed_timeout_s)
        self._last_plan: Plan | None = None
        self._connection: MqttConnection | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._replan_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listening_since: float | None = None  # monotonic time of the last (re)connect; None while offline
        self._started_at: float | None = None  # monotonic time of start(): the first connect is on its way
        self._heard: dict[str, float] = {}  # when each agent last delivered a result chunk (a sign of life)
        self._quarantined: frozenset[str] = frozenset()  # as the last housekeeping round saw them
        self._resent: dict[str, float] = {}  # when each agent last got its assignment again (state recovery)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the broker (in the background, reconnecting forever) and start the schedule."""
        if self._loop is not None:
            raise RuntimeError("coordinator already started")
        self._loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        status_topic = self.topics.coordinator_status()
        self._leadership = Leadership(
            self.settings, self.topics, self.instance_id, self.settings.leader_claim_window_s,
            publish=lambda topic, record, retain: self._publish(topic, record, retain=retain), loop=self._loop,
            on_elected=self._on_elected, on_deposed=self._on_deposed)
        self._connection = MqttConnection(
            self.settings,
            unique_client_id("coordinator", self.settings.coordinator_id),
            on_message=self._on_message,
            subscriptions=[(self.topics.all_agents(), 1), (self.topics.all_controls_of(TopicKind.ASSIGN), 1),
                           (self.topics.coordinator_leader(), 1)],
            will=OutboundMessage.of(status_topic, CoordinatorStatus(state="offline",
                                                                    coordinator_version=COORDINATOR_VERSION)),
            birth=lambda: OutboundMessage.of(status_topic, CoordinatorStatus(state="online",
                                                                             coordinator_version=COORDINATOR_VERSION)),
            on_ready=self._on_connected,
            on_disconnected=self._on_disconnected,
            loop=self._loop,
        )
        self._connection.start()
        self._leadership.start()
        self._scheduler = AsyncIOScheduler(event_loop=self._loop)
        self._scheduler.add_job(self._scheduled_replan, "interval", seconds=self.settings.replan_interval_s,
                                id="replan", coalesce=True, max_instances=1)
        self._scheduler.start()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="coordinator-housekeeping")
        catalog = str(self.settings.catalog_path) + (f" + {self.settings.catalog}" if self.settings.catalog else "")
        logger.info("coordinator %s started: broker %s, prefix %s, catalog %s (%d models), routing %s, "
                    "re-plan every %gs", self.settings.coordinator_id, self.settings.broker, self.topics.prefix,
                    catalog, len(self.catalog.models), self.settings.routing_policy,
                    self.settings.replan_interval_s)

    async def stop(self) -> None:
        """Vacate the leadership, cancel queries (and their jobs on the agents), stop the schedule, publish offline,
        disconnect."""
        if self._leadership is not None:
            await self._leadership.stop()  # first: a standby starts its claim while we wind down
        for run in self._ledger.runs():
            run.cancel("coordinator stopping")
        self._operations.stop("coordinator stopping")
        self._wakeup.notify()
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

    def _publish(self, topic: str, payload: bytes | Message, *, retain: bool = False) -> None:
        """Publish at QoS 1; without a connection (before start, after stop) there is nobody to tell."""
        if self._connection is not None:
            self._connection.publish(topic, payload, qos=1, retain=retain)

    # ------------------------------------------------------------------ inbound MQTT (event loop)

    def _on_message(self, message: InboundMessage) -> None:
        """Decode one message and hand it on: result chunks to their query, everything else to the registry."""
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        kind, agent_id = parsed
        if kind is TopicKind.COORDINATOR_LEADER:
            if self._leadership is not None:
                self._leadership.on_message(message)
            return
        if agent_id is None:
            return
        if not message.payload and kind.spec.retained:
            cleared = _CLEARED_EVENTS.get(kind)
            if cleared is not None:
                self._apply(cleared(agent_id, None))
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
        elif isinstance(payload, Operation):
            self._operations.deliver(agent_id, payload)
        elif isinstance(payload, Telemetry):
            self._on_telemetry(agent_id, payload)
        elif isinstance(payload, Assign) and self._stale_assignment(agent_id, payload):
            return
        elif (make_event := _RETAINED_EVENTS.get(type(payload))) is not None:
            before = self._state.agents.get(agent_id)
            if isinstance(payload, ModelState):
                self._adopt_assignment(agent_id, payload, before)
            self._apply(make_event(agent_id, payload))
            if not message.retain:  # a replayed retained message tells of the past, not of an agent starting now
                self._recover_assignment(agent_id, payload, was_online=before is not None and before.online)

    def _on_connected(self) -> None:
        """After every (re)connect: silence is judged from now on, and the retained assignments go back.

        A broker restarted without its persistence file (SIGKILL, a new machine) has forgotten the
        assignments, and an agent that restarts afterwards would wait for its model forever. The payload is
        the one published before (same assignment id), so agents that still have it treat it as a no-op.
        """
        self._listening_since = time.monotonic()
        if self._leadership is not None:
            self._leadership.on_connected()
        for record in list(self._state.agents.values()):
            if record.assignment is not None and self._leads():
                self._publish(self.topics.assign(record.agent_id), record.assignment, retain=True)

    def _settle_left(self) -> float:
        """Seconds left in which a query that finds no agent waits rather than fails: the first moments after
        starting or reconnecting, while every agent's retained state (or, on a broker that does not replay it to
        wildcard subscriptions, its re-published state) is still on its way; ``state_wait_s`` in all."""
        since = self._listening_since if self._listening_since is not None else self._started_at
        if since is None:
            return 0.0  # cut off from the broker: waiting would not bring the state any sooner
        return max(0.0, since + self.settings.state_wait_s - time.monotonic())

    def _leads(self) -> bool:
        """Whether this coordinator sends assignments: only the placement leader may, and only while connected
        (what it sent while cut off would arrive late, fenced or not)."""
        return self._leadership is not None and self._leadership.leading and self.connected

    @property
    def is_leader(self) -> bool:
        return self._leads()

    @property
    def leader_id(self) -> str | None:
        """The instance id that leads placement as far as we know (ours when we lead)."""
        return self._leadership.holder if self._leadership is not None else None

    @property
    def leader_epoch(self) -> int:
        """Our epoch while we lead, else the highest leader epoch we know; stamped on Assign and Manage."""
        return self._leadership.epoch if self._leadership is not None else 0

    def _stale_assignment(self, agent_id: str, assign: Assign) -> bool:
        """An assignment from a deposed leader (older epoch) read back from the broker: not the cluster's truth.

        The registry keeps the current one; the leader writes it back over the stale retained copy, so an agent
        that (re)starts later is not handed the deposed leader's plan.
        """
        if assign.epoch >= self.leader_epoch:
            return False
        logger.warning("ignored assignment %s for %s from a deposed leader (epoch %d < %d)", assign.assignment_id,
                       agent_id, assign.epoch, self.leader_epoch)
        record = self._state.agents.get(agent_id)
        if self._leads() and record is not None and record.assignment is not None:
            self._publish(self.topics.assign(agent_id), self._stamped(record.assignment), retain=True)
        return True

    def _stamped(self, assign: Assign) -> Assign:
        """The same assignment (same id: a no-op for the agent) under our epoch."""
        epoch = self.leader_epoch
        return assign if assign.epoch == epoch else assign.model_copy(update={"epoch": epoch})

    def _on_elected(self, epoch: int) -> None:
        """We lead now: the registry was rebuilt from retained messages and live telemetry while we stood by.

        Every agent's current assignment goes out again under our epoch — same id and model, so agents change
        nothing, and a deposed leader's late assignments are fenced from now on — then we plan, which keeps every
        model that still fits (placement's hysteresis) and changes only what must change.
        """
        for record in list(self._state.agents.values()):
            if record.assignment is not None:
                stamped = self._stamped(record.assignment)
                self._publish(self.topics.assign(record.agent_id), stamped, retain=True)
                self._apply(AssignmentSeen(record.agent_id, stamped))
        self._schedule_replan("elected")

    def _on_deposed(self, reason: str) -> None:
        if self._replan_handle is not None:
            self._replan_handle.cancel()
            self._replan_handle = None

    def _adopt_assignment(self, agent_id: str, state: ModelState, record: AgentRecord | None) -> None:
        """Take over the assignment an agent reports when we hold none for it (state recovery, docs/protocol.md).

        A coordinator (re)started on a broker that does not replay retained messages to wildcard subscriptions
        (RabbitMQ) never reads its predecessor's assignments; without this it would see every agent unassigned
        and hand out new assignment ids for the same models. The agent's model state names the assignment it
        answers (model, id and ``also``), so the registry keeps it unchanged, and an agent restarted later gets
        that same assignment back. A retained assignment read afterwards replaces it.
        """
        if state.assignment_id is None or not state.model or (record is not None and record.assignment is not None):
            return
        try:
            adopted = Assign(model=state.model, assignment_id=state.assignment_id, also=list(state.also),
                             reason="kept from before this coordinator started (as the agent reported it)",
                             epoch=self.leader_epoch)
        except ValueError as error:  # a name or id over the assignment's limits: nothing to adopt
            logger.warning("did not adopt %s's reported assignment: %s", agent_id, error)
            return
        logger.info("adopted %s's assignment %s (%s) as the agent reported it", agent_id, adopted.assignment_id,
                    adopted.model)
        self._apply(AssignmentSeen(agent_id, adopted))

    def _recover_assignment(self, agent_id: str, payload: Message, *, was_online: bool) -> None:
        """Send an agent its assignment again when it shows it may not have it (state recovery, docs/protocol.md).

        A broker may not hand a (re)starting agent its retained assignment: RabbitMQ's MQTT plugin replays
        retained messages only to exact subscriptions and keeps them on the cluster node that received them. So
        a live birth of an agent we held offline, or a live model state that names no assignment while we hold
        one for it, gets the same payload again — same assignment id, a no-op for an agent that has it. The
        model-state case is rate-limited, so an agent that keeps reporting none cannot make us flood it.
        """
        if isinstance(payload, Status):
            lost = payload.state == "online" and not was_online
        elif isinstance(payload, ModelState):
            lost = payload.assignment_id is None \
                and time.monotonic() - self._resent.get(agent_id, -ASSIGNMENT_RESEND_S) >= ASSIGNMENT_RESEND_S
        else:
            return
        record = self._state.agents.get(agent_id)
        if not lost or record is None or record.assignment is None or not record.online or not self._leads():
            return
        self._resent[agent_id] = time.monotonic()
        self._publish(self.topics.assign(agent_id), self._stamped(record.assignment), retain=True)
        logger.info("sent %s its assignment %s (%s) again", agent_id, record.assignment.assignment_id,
                    record.assignment.model)

    def _on_disconnected(self) -> None:
        """While we cannot hear anyone, nobody's silence means anything (see :meth:`_housekeep`)."""
        self._listening_since = None
        self._started_at = None  # from now on a query waits for state only after the next connect

    def _on_telemetry(self, agent_id: str, telemetry: Telemetry) -> None:
        """The heartbeat; its job counts tell routing how busy the agent is beyond our own jobs.

        At 5,000 agents this runs 5,000 times a second, and nearly every time it only refreshes the record: an
        online agent whose telemetry changes neither its runtime's reachability (its ready model) nor its
        measured speed (its score) cannot join, leave or change placement, so the registry is advanced without
        :meth:`_apply`'s reactions; and waiting queries are woken only when the load or slots it reports changed.
        """
        before = self._state.agents.get(agent_id)
        previous = before.telemetry if before is not None else None
        event = TelemetryReceived(agent_id, telemetry)
        if before is not None and previous is not None and before.online \
                and previous.backend_reachable == telemetry.backend_reachable \
                and previous.tokens_per_s == telemetry.tokens_per_s:
            self._state = apply(self._state, event, time.monotonic())
        else:
            self._apply(event)
        self._execution.report_load(agent_id, telemetry)
        if previous is None or previous.jobs_running != telemetry.jobs_running \
                or previous.jobs_queued != telemetry.jobs_queued or previous.max_parallel != telemetry.max_parallel \
                or previous.backend_reachable != telemetry.backend_reachable:
            self._wakeup.notify()

    def _on_result(self, agent_id: str, result: Result) -> None:
        """Hand a result chunk to the query waiting for it; only the agent the job went to may answer."""
        if self._embeddings.deliver(agent_id, result):
            return
        entry = self._ledger.find(result.request_id)
        if entry is None:
            self.metrics.chunks.labels("late").inc()
            self._execution.saw_other_chunk(agent_id, result)  # another front end's job: load for routing
            return
        run, attempt = entry
        if attempt.agent_id != agent_id:
            logger.warning("ignored result for %s from %s: the job went to %s", result.request_id, agent_id,
                           attempt.agent_id)
            self.metrics.chunks.labels("wrong_agent").inc()
            return
        self._chunks_ok.inc()
        self._heard[agent_id] = time.monotonic()
        run.deliver(result)

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
            self._operations.agent_gone(event.agent_id, f"agent {event.agent_id} went away ({why})")
            self._schedule_replan("agent_left")
        elif isinstance(event, HardwareReceived) and is_online and (before is None or before.hardware is None):
            self._schedule_replan("hardware")
        elif isinstance(event, ModelStateReceived) and is_online and after is not None and not after.can_pull \
                and (before is None or before.local_models != after.local_models):
            self._schedule_replan("local_models")  # a runtime that cannot pull is placed among what it has
        if isinstance(event, ModelStateReceived | StatusReceived):
            self._wakeup.notify()  # a model appeared on disk or in memory, or the runtime's slots changed
        if after is not None and after.hardware is not None and _may_change_score(event, before, after):
            agent_score(after, self.catalog)  # score on the event, so a plan finds every score memoised
        ready_before = before.ready_model if before is not None else None
        ready_after = after.ready_model if after is not None else None
        if ready_before != ready_after:
            logger.info("agent %s: ready model %s → %s", event.agent_id, ready_before, ready_after)
            if self._last_plan is not None and self._last_plan.deferred and ready_after is not None:
                self._schedule_replan("deferred")
            self._wakeup.notify()

    def _agent_gone(self, agent_id: str, reason: str) -> None:
        """Tell every query with a job on ``agent_id`` that the job will not finish there."""
        for run, attempt in self._ledger.attempts_on(agent_id):
            run.attempt_gone(attempt.wire_id, reason)

    # ------------------------------------------------------------------ housekeeping

    async def _housekeep(self) -> None:
        """Every HOUSEKEEPING_S: expire silent agents (see :meth:`_reconcile`)."""
        while True:
            due = time.monotonic() + HOUSEKEEPING_S
            await asyncio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            if now - due > HOUSEKEEPING_S:
                # The event loop itself was held up: messages from that time may still wait to be handled, so
                # silence measured now is ours, not the agents'. Listen afresh before judging anyone.
                logger.warning("coordinator loop ran %.1f s late; agent expiry waits a full period", now - due)
                if self._listening_since is not None:
                    self._listening_since = max(self._listening_since, now)
            try:
                self._reconcile(now)
            except Exception:  # noqa: BLE001 - housekeeping must survive a bug in one round
                logger.exception("housekeeping failed")

    def _reconcile(self, now: float) -> None:
        """Expire silent agents (an explicit, logged event), re-plan when the agents in quarantine change, and
        refresh the gauges.

        Only silence while we were listening counts: during our own broker outage every agent is silent, and
        expiring them all used to fail every running query although the agents kept answering (found by
        tests/test_faults_broker.py). After a reconnect an agent gets a full expiry period to speak again.
        """
        for expired in find_expired(self._state, now, self.settings.expiry_factor, self._listening_since,
                                    self._heard):
            logger.warning("agent %s expired: no telemetry for %.1f s (limit %.1f s)", expired.agent_id,
                           expired.silent_s, expired.limit_s)
            self.metrics.agent_expiries.inc()
            self._apply(expired)
        quarantined = frozenset(self._trust.quarantined(now))
        if quarantined != self._quarantined:  # an agent went into quarantine or came out: re-plan around it
            self._quarantined = quarantined
            self._schedule_replan("quarantine")
        online = self._state.online_agents()
        self.metrics.agents_online.set(len(online))
        self.metrics.agents_ready.set(sum(1 for record in online if record.ready_model))

    # ------------------------------------------------------------------ placement

    def _compute_plan(self) -> Plan:
        now = time.monotonic()
        return plan_placement(self._state, self.catalog, self.placement_settings, now, time.time(),
                              quarantined=self._trust.quarantined(now))

    def plan(self) -> PlanView:
        """What a re-plan would do now, without doing it (what-if)."""
        return self._compute_plan().view(applied=False)

    async def reassign(self) -> PlanView:
        """Re-plan now and publish the changes (on a standby: what the leader's plan would do, not applied)."""
        return self._replan("on_demand").view(applied=self._leads())

    def _replan(self, trigger: str) -> Plan:
        plan = self._compute_plan()
        self._last_plan = plan
        self.metrics.replans.labels(trigger).inc()
        if not self._leads():
            logger.debug("re-plan (%s) on a standby: %d change(s) left to the leader %s", trigger,
                         len(plan.changes), self.leader_id)
            return plan
        for entry in plan.changes:
            reason = entry.reason + (f"; also keeps {', '.join(entry.also)} (fits beside it)" if entry.also else "")
            assign = Assign(model=entry.target_model, assignment_id=uuid.uuid4().hex[:16], reason=reason[:2000],
                            also=list(entry.also), epoch=self.leader_epoch)
            self._publish(self.topics.assign(entry.agent_id), assign, retain=True)
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
        if not self._leads():
            return  # placement runs on the leader only
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
            except Exception:  # noqa: BLE001 - logged with its trigger; the next change or the schedule re-plans
                logger.exception("re-plan after %s failed", trigger)

        self._replan_handle = self._loop.call_later(self.settings.replan_debounce_s, run)

    # ------------------------------------------------------------------ views

    def snapshot(self) -> ClusterSnapshot:
        """The cluster now; safe from any thread (the registry is immutable) and free of side effects."""
        now = time.monotonic()
        snapshot = cluster_snapshot(self._state, self._last_plan, self.catalog, cooling=self._breaker.cooling(now),
                                    standings=self._trust.standings(now), connected=self.connected, now=now,
                                    generated_at=time.time())
        leadership = LeadershipView(instance_id=self.instance_id, leader_id=self.leader_id,
                                    leading=self.is_leader, epoch=self.leader_epoch)
        return dataclasses.replace(snapshot, leadership=leadership)

    def model_names(self, chat_only: bool = False) -> list[str]:
        """Every model some online agent can answer with now — ready, loaded or on disk — by display name;
        ``chat_only`` leaves out embedding models (for a chat model picker)."""
        return [model.name for model in self.models() if not (chat_only and model.embedding)]

    def models(self) -> list[ModelAvailability]:
        """Every servable model with the agents that have it and in what state (ready, loaded, local), plus what
        the catalog knows (parameters, memory, context length); for ``/v1/models``, ``/api/tags`` and the picker.
        Agents in quarantine serve nothing, so what only they claim to have is not listed."""
        return availability.model_availability(self._state, self.catalog, self._trust.quarantined(time.monotonic()))

    def loaded_models(self) -> list[LoadedModel]:
        """What is loaded where, from the agents' runtimes (Ollama's ``/api/ps``); for the cluster's ``/api/ps``."""
        return availability.loaded_models(self._state, self.catalog, self._trust.quarantined(time.monotonic()))

    # ------------------------------------------------------------------ model management

    def manage_targets(self, action: str, model: str, agents: list[str] | None = None) -> tuple[list[str], str]:
        """Which agents a model operation would go to, and why (explicit ``agents``, or where the plan wants it)."""
        return self._operations.targets(action, model, agents)

    async def manage(self, action: str, model: str, *, agents: list[str] | None = None,
                     timeout_s: float | None = None, request_id: str | None = None) -> AsyncIterator[ManageEvent]:
        """Pull, delete, load or unload ``model`` on ``agents`` (default: where the plan or the agents' models say)
        and stream the agents' progress: ManageStarted, ManageProgress per report, then ManageFinished.

        Closing the stream early stops following (the agents finish the operation anyway).
        """
        async for event in self._operations.run(action, model, agents=agents, request_id=request_id or
                                                new_request_id(),
                                                timeout_s=timeout_s or self.settings.manage_timeout_s):
            yield event

    # ------------------------------------------------------------------ queries

    async def query(self, request: QueryRequest) -> AsyncIterator[QueryEvent]:
        """Answer ``request`` as a stream of events ending with QueryFinished or QueryFailed.

        Closing the generator early (``aclose()``) cancels the query and its jobs on the agents.
        """
        out: asyncio.Queue[QueryEvent | None] = asyncio.Queue()

        async def produce() -> None:
            try:
                await self._execution.execute(request, out.put_nowait)
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

    async def embed(self, model: str, inputs: list[str], timeout_s: float | None = None,
                    options: dict[str, Any] | None = None) -> EmbeddingAnswer:
        """Vectors for ``inputs`` from the agents that have ``model`` (broker/coordinator/embedding.py);
        raises :class:`~broker.coordinator.embedding.EmbeddingFailed` with a code and a reason."""
        return await self._embeddings.embed(model, inputs, timeout_s, options)

    async def cancel(self, request_id: str) -> bool:
        """Cancel a running query; its stream ends with QueryFailed(code="cancelled")."""
        run = self._ledger.run(request_id)
        if run is None:
            return False
        run.cancel("cancelled by the caller")
        self._wakeup.notify()
        return True


def _may_change_score(event: Event, before: AgentRecord | None, after: AgentRecord) -> bool:
    """Whether ``event`` may change the agent's score (hardware or measured speed); telemetry at 1 Hz rarely does."""
    if isinstance(event, TelemetryReceived):
        old = before.telemetry.tokens_per_s if before is not None and before.telemetry is not None else None
        new = after.telemetry.tokens_per_s if after.telemetry is not None else None
        return old != new
    return not isinstance(event, StatusReceived | AgentExpired)

"""Placement leadership: exactly one of several coordinators on one broker assigns models (docs/protocol.md).

Every instance keeps the full registry and routes its own queries; only the leader plans and publishes
assignments. The lease lives on the broker:

* the leader holds a second MQTT connection of its own, the *lease*, whose birth is the retained leader record
  (``state: leader``, its id, its epoch) and whose last will is the same record with ``state: vacant``. One
  connection per term, so the will always names the right holder and epoch; a standby never has a will on the
  leader topic, so a standby that dies vacates nothing.
* a standby that sees the holder's record vacant (or no record at all after a listening window) bids with a
  ``claim`` (not retained), waits the claim window, and leads if its bid is the best one it heard: highest epoch,
  then lowest instance id. Every instance hears the same bids on the one topic, so they agree.
* epochs are ``max(highest seen + 1, Unix milliseconds)``: they grow across a broker restart that forgot the
  record, so an agent that remembers an old leader's epoch never fences out every new one.
* every Assign and Manage carries the epoch; agents refuse anything older than the highest they have seen
  (``agent.models.EpochFence``), so a deposed leader whose queued publishes arrive late moves no model.
* a leader re-asserts its record when it hears a claim, a stale record or another instance's vacancy (a late will),
  and steps down when it hears a better record or loses its lease connection.

:class:`LeaseState` is the pure state machine (unit-tested); :class:`Leadership` wires it to MQTT and a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from broker.mqtt.client import InboundMessage, MqttConnection, OutboundMessage, unique_client_id
from broker.mqtt.settings import MqttSettings
from broker.protocol import LeaderRecord, PayloadError, Topics, decode, encode
from broker.protocol.messages import MAX_EPOCH

logger = logging.getLogger(__name__)

TICK_S = 0.05
"""How often claim windows and listening windows are checked."""


class Role(enum.Enum):
    STANDBY = "standby"
    CLAIMING = "claiming"
    LEADER = "leader"


@dataclass(frozen=True)
class Claim:
    """Publish a bid for ``epoch`` (not retained)."""

    epoch: int


@dataclass(frozen=True)
class Lead:
    """The bid won: open the lease (its birth is the retained leader record)."""

    epoch: int


@dataclass(frozen=True)
class Reassert:
    """Publish our leader record again: the retained one on the broker is not ours, or a claimant must hear us."""


@dataclass(frozen=True)
class StepDown:
    """Someone better leads (or our lease is gone): stop acting as the leader."""

    reason: str


Action = Claim | Lead | Reassert | StepDown


def better(first_epoch: int, first_id: str, second_epoch: int, second_id: str) -> bool:
    """The tie-break every instance applies: the higher epoch wins, then the lower id."""
    return first_epoch > second_epoch or (first_epoch == second_epoch and first_id < second_id)


def next_epoch(highest: int, now_unix: float) -> int:
    """An epoch above every epoch seen, and above every epoch handed out before (Unix milliseconds)."""
    return min(MAX_EPOCH, max(highest + 1, int(now_unix * 1000)))


class LeaseState:
    """The lease state machine of one instance; feed it records and ticks, carry out the actions it returns.

    Times are monotonic seconds passed in by the caller, so tests drive it without sleeping.
    """

    def __init__(self, instance_id: str, claim_window_s: float, clock: Callable[[], float] = time.time) -> None:
        self.instance_id = instance_id
        self.claim_window_s = claim_window_s
        self._clock = clock
        self.role = Role.STANDBY
        self.epoch = 0  # ours, while claiming or leading
        self.holder: LeaderRecord | None = None  # the leader record we believe in (another instance's or ours)
        self.highest_epoch = 0  # the highest epoch of any leader record seen
        self.claims: dict[str, int] = {}  # bids heard in the current round: instance id → epoch
        self._listening_until: float | None = None  # no record by then: the seat is vacant
        self._vacant = False
        self._claim_deadline: float | None = None
        self._retry_at = 0.0  # after yielding to a bid that never became a leader, bid again from then on
        self.connected = False

    @property
    def leading(self) -> bool:
        return self.role is Role.LEADER

    def record(self, state: str = "leader") -> LeaderRecord:
        """Our own record for the current epoch (``leader`` for the birth, ``vacant`` for the will)."""
        since = self.holder.since if self.holder is not None and self.holder.coordinator_id == self.instance_id \
            else None
        return LeaderRecord(state=state, coordinator_id=self.instance_id, epoch=self.epoch,  # type: ignore[arg-type]
                            since=since or self._clock())

    # ------------------------------------------------------------------ connection

    def on_connected(self, now: float) -> list[Action]:
        """Subscribed (again): the retained record arrives within moments; without one the seat is vacant."""
        self.connected = True
        if self.role is not Role.LEADER:
            self.role = Role.STANDBY
            self.holder = None
            self._vacant = False
            self._claim_deadline = None
            self._listening_until = now + self.claim_window_s
        return []

    def on_disconnected(self) -> list[Action]:
        """We hear nobody: a bid cannot be judged. A leader keeps its lease while the lease connection holds."""
        self.connected = False
        if self.role is Role.CLAIMING:
            self.role = Role.STANDBY
            self._claim_deadline = None
        return []

    def on_lease_lost(self) -> list[Action]:
        """The lease connection dropped: its will has vacated (or will vacate) our record; we no longer lead."""
        if self.role is not Role.LEADER:
            return []
        self.role = Role.STANDBY
        self.holder = None
        self._vacant = True
        return [StepDown("lease connection lost")]

    # ------------------------------------------------------------------ records

    def on_record(self, record: LeaderRecord, now: float) -> list[Action]:
        if record.state == "claim":
            return self._on_claim(record)
        if record.state == "leader":
            return self._on_leader(record)
        return self._on_vacant(record)

    def _on_claim(self, record: LeaderRecord) -> list[Action]:
        if record.coordinator_id != self.instance_id:
            self.claims[record.coordinator_id] = max(record.epoch, self.claims.get(record.coordinator_id, 0))
        return [Reassert()] if self.role is Role.LEADER else []

    def _on_leader(self, record: LeaderRecord) -> list[Action]:
        self._listening_until = None
        if self.role is Role.LEADER:
            if record.coordinator_id == self.instance_id and record.epoch == self.epoch:
                return []  # our own birth coming back
            if better(record.epoch, record.coordinator_id, self.epoch, self.instance_id):
                self.highest_epoch = max(self.highest_epoch, record.epoch)
                self.role = Role.STANDBY
                self.holder = record
                self._vacant = False
                return [StepDown(f"{record.coordinator_id} leads with epoch {record.epoch}")]
            return [Reassert()]  # a stale record (a deposed leader's late birth) overwrote ours on the broker
        if self.holder is not None and better(self.holder.epoch, self.holder.coordinator_id, record.epoch,
                                              record.coordinator_id):
            return []  # stale: the holder will re-assert
        self.highest_epoch = max(self.highest_epoch, record.epoch)
        if self.holder is None or (self.holder.coordinator_id, self.holder.epoch) != (record.coordinator_id,
                                                                                    record.epoch):
            logger.info("standing by: %s leads placement (epoch %d)", record.coordinator_id, record.epoch)
        self.holder = record
        self._vacant = False
        self.claims.clear()
        if self.role is Role.CLAIMING:
            logger.info("claim for epoch %d withdrawn: %s leads with epoch %d", self.epoch, record.coordinator_id,
                        record.epoch)
            self.role = Role.STANDBY
            self._claim_deadline = None
        return []

    def _on_vacant(self, record: LeaderRecord) -> list[Action]:
        self._listening_until = None
        if self.role is Role.LEADER:
            if record.coordinator_id == self.instance_id and record.epoch == self.epoch:
                return self.on_lease_lost()
            return [Reassert()]  # another instance's late will overwrote our record
        holder = self.holder
        if holder is not None and not (record.coordinator_id == holder.coordinator_id
                                       and record.epoch >= holder.epoch):
            return []  # the vacancy of someone who no longer holds the seat
        self.highest_epoch = max(self.highest_epoch, record.epoch)
        self.holder = None
        if not self._vacant:
            logger.info("leadership vacant (%s, epoch %d)", record.coordinator_id, record.epoch)
        self._vacant = True
        return []

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Action]:
        """Start a bid on a vacancy; settle a bid whose window has passed."""
        if not self.connected:
            return []
        if self._listening_until is not None and now >= self._listening_until:
            self._listening_until = None
            if self.holder is None:
                self._vacant = True  # nobody has ever led on this broker (or it forgot)
        if self.role is Role.STANDBY and self._vacant and self.holder is None and now >= self._retry_at:
            self.role = Role.CLAIMING
            self.epoch = next_epoch(max(self.highest_epoch, *self.claims.values(), 0), self._clock())
            self.claims.clear()
            self._claim_deadline = now + self.claim_window_s
            logger.info("%s claims leadership with epoch %d", self.instance_id, self.epoch)
            return [Claim(self.epoch)]
        if self.role is Role.CLAIMING and self._claim_deadline is not None and now >= self._claim_deadline:
            self._claim_deadline = None
            best_id, best_epoch = self.instance_id, self.epoch
            for claimant, epoch in self.claims.items():
                if better(epoch, claimant, best_epoch, best_id):
                    best_id, best_epoch = claimant, epoch
            if best_id != self.instance_id:
                logger.info("%s yields to %s's claim (epoch %d)", self.instance_id, best_id, best_epoch)
                self.role = Role.STANDBY
                self._retry_at = now + 2 * self.claim_window_s  # unless its leader record arrives by then
                return []
            self.role = Role.LEADER
            self.highest_epoch = max(self.highest_epoch, self.epoch)
            self._vacant = False
            self.holder = LeaderRecord(state="leader", coordinator_id=self.instance_id, epoch=self.epoch,
                                       since=self._clock())
            self.claims.clear()
            return [Lead(self.epoch)]
        return []

    def current_epoch(self) -> int:
        """The epoch to stamp on what we send: ours while leading, else the highest leader epoch we know."""
        return self.epoch if self.role is Role.LEADER else self.highest_epoch


def instance_id_for(coordinator_id: str) -> str:
    """A unique, protocol-valid id for this process: the configured name (which several instances may share)
    plus a random suffix; the tie-break compares these."""
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in coordinator_id)[:47].lstrip("_.-") or "coordinator"
    return f"{stem}.{uuid.uuid4().hex[:12]}"


class Leadership:
    """Runs :class:`LeaseState` on the coordinator's event loop: publishes bids, holds the lease connection."""

    def __init__(self, settings: MqttSettings, topics: Topics, instance_id: str, claim_window_s: float, *,
                 publish: Callable[[str, LeaderRecord, bool], None], loop: asyncio.AbstractEventLoop,
                 on_elected: Callable[[int], None], on_deposed: Callable[[str], None]) -> None:
        self.settings = settings
        self.topics = topics
        self.instance_id = instance_id
        self.state = LeaseState(instance_id, claim_window_s)
        self._publish = publish
        self._loop = loop
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._lease: MqttConnection | None = None
        self._lease_ready = False
        self._ticker: asyncio.Task[None] | None = None
        self.elected_at: float | None = None  # monotonic time the current term began acting

    @property
    def leading(self) -> bool:
        """True while we lead and our lease is on the broker (only then may we assign)."""
        return self.state.leading and self._lease_ready

    @property
    def epoch(self) -> int:
        return self.state.current_epoch()

    @property
    def holder(self) -> str | None:
        holder = self.state.holder
        return holder.coordinator_id if holder is not None else None

    def start(self) -> None:
        self._ticker = self._loop.create_task(self._tick_forever(), name="leadership")

    async def stop(self) -> None:
        """Stop ticking; a leader vacates its record at once so a standby takes over without waiting."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._lease is not None:
            lease, self._lease = self._lease, None
            final = OutboundMessage.of(self.topics.coordinator_leader(), self.state.record("vacant")) \
                if self.state.leading else None
            self._lease_ready = False
            await self._loop.run_in_executor(None, lease.stop, final)

    # ------------------------------------------------------------------ inputs (event loop)

    def on_connected(self) -> None:
        self._carry_out(self.state.on_connected(time.monotonic()))

    def on_disconnected(self) -> None:
        self._carry_out(self.state.on_disconnected())

    def on_message(self, message: InboundMessage) -> None:
        if not message.payload:
            return  # a cleared record: nothing to learn; the tick finds no holder after the listening window
        try:
            record = decode(LeaderRecord, message.payload, topic=message.topic)
        except PayloadError as error:
            logger.warning("dropped %s", error)
            return
        self._carry_out(self.state.on_record(record, time.monotonic()))

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._carry_out(self.state.tick(time.monotonic()))
            except Exception:  # noqa: BLE001 - leadership must keep ticking through one bad round
                logger.exception("leadership tick failed")

    # ------------------------------------------------------------------ actions

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Claim):
                self._publish(self.topics.coordinator_leader(), self.state.record("claim"), False)
            elif isinstance(action, Lead):
                self._open_lease(action.epoch)
            elif isinstance(action, Reassert):
                if self._lease_ready:
                    self._publish(self.topics.coordinator_leader(), self.state.record("leader"), True)
            elif isinstance(action, StepDown):
                self._close_lease()
                logger.warning("%s no longer leads placement: %s", self.instance_id, action.reason)
                self.elected_at = None
                self._on_deposed(action.reason)

    def _open_lease(self, epoch: int) -> None:
        self._close_lease()
        topic = self.topics.coordinator_leader()
        will = OutboundMessage(topic, encode(self.state.record("vacant")), 1, True)

        def birth() -> OutboundMessage | None:
            return OutboundMessage.of(topic, self.state.record("leader")) \
                if self.state.leading and self.state.epoch == epoch else None

        lease = MqttConnection(self.settings, unique_client_id("coordinator-lease", self.instance_id),
                               on_message=lambda message: None, loop=self._loop, will=will, birth=birth,
                               on_ready=lambda: self._lease_up(lease, epoch),
                               on_disconnected=lambda: self._lease_down(lease))
        self._lease = lease
        self._lease_ready = False
        lease.start()

    def _lease_up(self, lease: MqttConnection, epoch: int) -> None:
        if lease is not self._lease or not self.state.leading or self.state.epoch != epoch:
            return
        first = not self._lease_ready and self.elected_at is None
        self._lease_ready = True
        if first:
            self.elected_at = time.monotonic()
            logger.warning("%s leads placement (epoch %d)", self.instance_id, epoch)
            self._on_elected(epoch)

    def _lease_down(self, lease: MqttConnection) -> None:
        if lease is self._lease:
            self._carry_out(self.state.on_lease_lost())

    def _close_lease(self) -> None:
        """Close the lease without a will (a clean DISCONNECT): whoever deposed us holds the seat now."""
        lease, self._lease = self._lease, None
        self._lease_ready = False
        if lease is not None:
            lease.stop()

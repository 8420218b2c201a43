"""The agent process: one asyncio loop wiring MQTT, the backend, the model manager and the job runner.

paho runs on this loop (MqttConnection with ``loop=``, paho's external-loop
API); everything else — jobs, pulls, health checks, telemetry — runs as
tasks on the loop, so nothing blocks the MQTT client. Retained state
(status, hardware, model) is re-published after every reconnect, because a
restarted broker without persistence has forgotten it, and again a moment
after a coordinator's birth message, because a broker that does not replay
retained messages to wildcard subscriptions (RabbitMQ's MQTT plugin) never
shows it to a coordinator that started after us (docs/brokers.md).

``python -m agent`` runs ``await agent.run()`` until ``agent.request_stop()``
(SIGTERM / Ctrl-C). Tests run the same coroutine on a thread of their own
(``tests/support/loops.py``, ``AgentThread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

from agent import __version__
from agent.backends import Backend, BackendError, BackendUnreachable, make_backend
from agent.hardware import GIB, GpuMonitor, HardwareProfile, load_profile, probe_hardware
from agent.health import BackendMonitor
from agent.identity import resolve_agent_id
from agent.jobs import JobRunner
from agent.models import ModelManager
from agent.operations import ModelOperations
from agent.runtime_profile import RuntimeKeeper
from agent.settings import AgentSettings
from broker.heap import settle_heap
from broker.mqtt.client import InboundMessage, MqttAuthError, MqttConnection, OutboundMessage
from broker.protocol import (
    Assign,
    Benchmark,
    Cancel,
    CoordinatorStatus,
    Hardware,
    Job,
    Manage,
    ModelState,
    Operation,
    PayloadError,
    Result,
    RuntimeProfile,
    Status,
    Telemetry,
    TopicKind,
    Topics,
    decode,
)
from broker.protocol.topics import DEFAULT_PREFIX

logger = logging.getLogger(__name__)

EMPTY_RUNTIME_RETRY_S = 15.0
"""How often a runtime that listed no models is asked again (its operator may load one without a restart)."""
BENCHMARK_REFRESH_S = 300.0
"""How often measured job speed may replace the published benchmark."""
RECOVERY_JITTER_S = 1.0
"""Longest random wait before re-publishing our state to a coordinator that came online (at most half a telemetry
interval): a thousand agents answering one birth message spread over it instead of arriving in one burst."""


def agent_client_id(agent_id: str, prefix: str) -> str:
    """MQTT client id of an agent: unique per (agent id, topic prefix), readable for the default prefix."""
    if prefix == DEFAULT_PREFIX:
        return f"slb-agent-{agent_id}"
    return f"slb-agent-{agent_id}-{hashlib.sha256(prefix.encode()).hexdigest()[:6]}"


T = TypeVar("T")


async def in_daemon_thread(function: Callable[..., T], *args: object) -> T:
    """Run slow probing (py-cpuinfo takes seconds) where it cannot delay shutdown, unlike ``to_thread``."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(outcome: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome, error = function(*args), None
        except Exception as failure:  # noqa: BLE001 - handed to the awaiting task
            outcome, error = None, failure
        with contextlib.suppress(RuntimeError):  # the loop may be gone when the agent stopped meanwhile
            loop.call_soon_threadsafe(deliver, outcome, error)

    threading.Thread(target=work, name=f"probe-{getattr(function, '__name__', 'work')}", daemon=True).start()
    return await future


class Agent:
    """One machine of the cluster."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        backend: Backend | None = None,
        hardware: Hardware | None = None,
    ) -> None:
        self.agent_id = resolve_agent_id(settings.data_dir, settings.agent_id)
        password = settings.mqtt_password or settings.broker.password
        if password and not (settings.mqtt_username or settings.broker.username):
            settings = settings.model_copy(update={"mqtt_username": self.agent_id})
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.profile: HardwareProfile | None = load_profile(settings.hardware_profile) \
            if settings.hardware_profile else None
        self.backend = backend or make_backend(settings)
        self.hardware = hardware
        self.runtime = RuntimeKeeper(self.backend, limit=settings.resolved_max_parallel,
                                     probe=settings.probe_runtime, on_change=self._on_runtime_profile)
        self.hostname = socket.gethostname()
        self.exit_code = 0
        self.connection: MqttConnection | None = None
        self.monitor: BackendMonitor | None = None
        self.models: ModelManager | None = None
        self.jobs: JobRunner | None = None
        self.operations: ModelOperations | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._benchmark_updated = 0.0
        self._gpu_monitor: GpuMonitor | None = None
        self._killed = False
        self._recovery: asyncio.TimerHandle | None = None  # a pending re-publish for a coordinator's birth

    # ------------------------------------------------------------------ messages we publish

    def _status(self, state: str) -> Status:
        monitor = self.monitor
        return Status(
            state=state,  # type: ignore[arg-type]
            agent_version=__version__,
            backend=self.backend.name,
            backend_url=self.backend.url or None,
            backend_reachable=monitor.reachable if monitor else None,
            backend_error=monitor.error if monitor else None,
            simulated=self.backend.simulated,
            hostname=self.hostname,
            max_parallel=self.max_parallel,
            runtime=self.runtime.profile,
        )

    def _birth(self) -> OutboundMessage:
        return OutboundMessage.of(self.topics.status(self.agent_id), self._status("online"))

    def _publish_retained(self, topic: str, message: Status | Hardware | ModelState) -> None:
        """Retained state goes out only while connected: after a reconnect the latest is re-published anyway."""
        if self.connection is not None and self.connection.connected:
            self.connection.publish(topic, message, qos=1, retain=True, queue_if_offline=False)

    def publish_status(self) -> None:
        self._publish_retained(self.topics.status(self.agent_id), self._status("online"))

    def publish_hardware(self) -> None:
        if self.hardware is not None:
            self._publish_retained(self.topics.hardware(self.agent_id), self.hardware)

    def _publish_model_state(self, state: ModelState) -> None:
        """With the assignment's ``also``, so a coordinator that never read the retained assignment can adopt it."""
        assignment = self.models.assignment if self.models is not None else None
        if assignment is not None and assignment.also and state.assignment_id == assignment.assignment_id:
            state = state.model_copy(update={"also": list(assignment.also)})
        self._publish_retained(self.topics.model(self.agent_id), state)

    def _publish_result(self, result: Result) -> None:
        if self.connection is not None:
            self.connection.publish(self.topics.result(self.agent_id), result, qos=1)

    def _publish_operation(self, operation: Operation) -> None:
        if self.connection is not None:
            self.connection.publish(self.topics.operation(self.agent_id), operation, qos=1)

    @property
    def max_parallel(self) -> int:
        """Jobs run at once: the runtime's slots as measured (or reported), one until known."""
        return self.runtime.slots

    # ------------------------------------------------------------------ callbacks (event loop)

    def _on_connected(self) -> None:
        """After every (re)connect: the birth is out; re-publish the other retained state."""
        self.publish_hardware()
        if self.models is not None:
            self._publish_model_state(self.models.state)

    def _republish_state(self) -> None:
        """Status, hardware and model state again, for a coordinator that did not get them as retained messages."""
        self._recovery = None
        self.publish_status()
        self._on_connected()

    def _on_coordinator_status(self, message: InboundMessage) -> None:
        """A coordinator came online: tell it our state after a short random wait (state recovery, docs/protocol.md).

        A retained birth replayed by our own subscribe is skipped: the state went out with our own birth then.
        Several births within the wait give one re-publish.
        """
        if message.retain or not message.payload or self._loop is None:
            return
        try:
            status = decode(CoordinatorStatus, message.payload, topic=message.topic)
        except PayloadError as error:
            logger.warning("ignored coordinator status: %s", error)
            return
        if status.state != "online" or self._recovery is not None:
            return
        delay = random.uniform(0.0, min(RECOVERY_JITTER_S, self.settings.telemetry_interval_s / 2))
        logger.info("a coordinator came online: re-publishing our state in %.2f s", delay)
        self._recovery = self._loop.call_later(delay, self._republish_state)

    def _on_fatal(self, error: Exception) -> None:
        logger.error("stopping: %s", error)
        self.exit_code = 2 if isinstance(error, MqttAuthError) else 1
        self.request_stop()

    def _on_message(self, message: InboundMessage) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is not None and parsed[0] is TopicKind.COORDINATOR_STATUS:
            self._on_coordinator_status(message)
            return
        if parsed is None or parsed[1] != self.agent_id:
            return
        kind = parsed[0]
        assert self.models is not None and self.jobs is not None
        if kind is TopicKind.ASSIGN:
            if not message.payload:  # a cleared retained assignment
                self.models.handle_assign(None)
                return
            try:
                assign = decode(Assign, message.payload, topic=message.topic)
            except PayloadError as error:
                logger.warning("ignored assignment: %s", error)
                return
            self.models.handle_assign(assign)
        elif kind is TopicKind.JOB:
            try:
                job = decode(Job, message.payload, topic=message.topic)
            except PayloadError as error:
                self.jobs.reject_payload(message.payload, error.reason)
                return
            self.jobs.submit(job)
        elif kind is TopicKind.CANCEL:
            try:
                cancel = decode(Cancel, message.payload, topic=message.topic)
            except PayloadError as error:
                logger.warning("ignored cancel: %s", error)
                return
            self.jobs.cancel(cancel.request_id, cancel.reason)
        elif kind is TopicKind.MANAGE and self.operations is not None:
            try:
                request = decode(Manage, message.payload, topic=message.topic)
            except PayloadError as error:
                logger.warning("ignored manage request: %s", error)
                return
            if not self.models.fence.admit(request.epoch, f"manage request {request.request_id}"):
                self._publish_operation(Operation(
                    request_id=request.request_id, action=request.action, model=request.model, status="refused",
                    done=True, error=f"refused: sent by a deposed coordinator (epoch {request.epoch} is older than "
                    f"{self.models.fence.highest})"))
                return
            self.operations.submit(request)

    def _check_model(self, model: str) -> tuple[str, str] | None:
        assert self.models is not None and self.monitor is not None
        if self.monitor.reachable is False:
            return "backend_down", self.monitor.error or f"backend unreachable at {self.backend.url}"
        return self.models.check_model(model, self.settings.serve_local_models)

    def _on_backend_change(self, reachable: bool) -> None:
        self.publish_status()
        if self.models is None:
            return
        if reachable:
            self.models.backend_back()
        else:
            assert self.monitor is not None
            self.models.backend_lost(self.monitor.error or f"backend unreachable at {self.backend.url}")

    def _on_local_models(self, models: list[str]) -> None:
        if self.models is not None:
            self.models.update_local_models(models)

    async def _refresh_inventory(self) -> None:
        """What the runtime has and holds in memory now (after a pull, delete or unload, and while idle)."""
        models = await self.backend.list_models()
        loaded = await self.backend.loaded_models()
        if self.models is not None:
            self.models.update_local_models(models, loaded)

    async def _refresh_while_idle(self) -> None:
        """The periodic refresh, skipped for a runtime that interrupts answers: it may be shared with other users
        (a chat UI, scripts) whose answers our idle listing would cut short, and it cannot pull, so its models
        change only when its operator restarts it."""
        if not self.runtime.fragile:
            await self._refresh_inventory()

    def _refresh_soon(self) -> None:
        """A job may have loaded a model (Ollama loads on first use): report what is in memory once the runtime
        is idle again, so /api/ps is current. One refresh at a time; never on a runtime a request disturbs."""
        if self.runtime.fragile or self._refresh_task is not None or self._loop is None:
            return

        async def refresh() -> None:
            try:
                await asyncio.sleep(0.5)
                if self.jobs is not None and self.jobs.slots.busy == 0:
                    await self._refresh_inventory()
            except BackendError as error:
                logger.debug("refreshing the model inventory after a job failed: %s", error)
            finally:
                self._refresh_task = None

        self._refresh_task = self._loop.create_task(refresh(), name="inventory-refresh")

    def _on_runtime_profile(self, profile: RuntimeProfile) -> None:
        """The runtime's real slot count bounds the job runner; the coordinator learns it from the status."""
        if self.jobs is not None:
            self.jobs.set_capacity(profile.slots)
        self.publish_status()

    async def _learn_runtime(self) -> None:
        """Detect the runtime; a runtime that cannot pull is measured now with a model it serves.

        A runtime that can pull (Ollama) is measured when its assigned model is ready (ModelManager), so no
        model the plan does not want is loaded just to be measured.
        """
        assert self.jobs is not None and self.monitor is not None
        while True:
            await self.monitor.wait_reachable()
            try:
                if self.runtime.facts is None:
                    await self.runtime.detect()
                if self.runtime.can_pull:
                    return
                models = await self.backend.list_models()
                if not models:
                    problem = (f"the {self.runtime.facts.kind if self.runtime.facts else ''} runtime at "
                               f"{self.backend.url} lists no models: load a model there (this agent has nothing "
                               "to serve until then)")
                    logger.warning("%s", problem)
                    if self.models is not None:
                        self.models.report_problem(problem)
                    await asyncio.sleep(EMPTY_RUNTIME_RETRY_S)  # nothing runs there: asking again disturbs no one
                    continue
                if self.models is not None:
                    self.models.update_local_models(models)
                async with self.jobs.slots.exclusive():
                    await self.runtime.measure(models[0])
                    benchmark = await self.models.benchmark_once(models[0]) if self.models is not None else None
                if benchmark is not None:
                    self._on_benchmark(benchmark)
                return
            except BackendUnreachable as error:
                self.monitor.report_unreachable(str(error))
            except BackendError as error:
                logger.warning("could not learn the runtime at %s: %s", self.backend.url, error)
                return

    def _on_job_unreachable(self, error: BackendUnreachable) -> None:
        if self.monitor is not None:
            self.monitor.report_unreachable(str(error))

    def _on_benchmark(self, benchmark: Benchmark) -> None:
        if self.hardware is None:
            return
        self.hardware = self.hardware.model_copy(update={"benchmark": benchmark, "ts": time.time()})
        self._benchmark_updated = time.monotonic()
        self.publish_hardware()

    def _on_job_finished(self, model: str, tokens_per_s: float | None, ttft_s: float | None) -> None:
        """Keep the published benchmark honest with what real jobs measure (at most every few minutes)."""
        self._refresh_soon()
        if tokens_per_s is None or self.hardware is None or self.jobs is None:
            return
        current = self.hardware.benchmark
        if current is not None and time.monotonic() - self._benchmark_updated < BENCHMARK_REFRESH_S:
            return
        speed, ttft = self.jobs.recent.summary(model)
        if speed is None:
            return
        if current is None or current.model != model or abs(speed - current.tokens_per_s) > 0.15 * current.tokens_per_s:
            self._on_benchmark(Benchmark(model=model, tokens_per_s=speed, ttft_s=ttft))
        else:
            self._benchmark_updated = time.monotonic()

    # ------------------------------------------------------------------ periodic work

    def _sample(self) -> Telemetry:
        assert self.jobs is not None
        memory = psutil.virtual_memory()
        gpu_util, vram_free = self._gpu_monitor.sample() if self._gpu_monitor else (None, None)
        tokens_per_s, ttft_s = self.jobs.recent.summary()
        return Telemetry(
            cpu_percent=psutil.cpu_percent(None),
            ram_used_gb=round((memory.total - memory.available) / GIB, 2),
            ram_free_gb=round(memory.available / GIB, 2),
            gpu_util_percent=gpu_util,
            vram_free_gb=vram_free,
            jobs_running=self.jobs.running,
            jobs_queued=self.jobs.queued,
            max_parallel=self.max_parallel,
            tokens_per_s=tokens_per_s,
            ttft_s=ttft_s,
            backend_reachable=self.monitor.reachable if self.monitor else None,
            simulated=self.backend.simulated,
            interval_s=self.settings.telemetry_interval_s,
        )

    async def _telemetry_loop(self) -> None:
        assert self._stop is not None
        psutil.cpu_percent(None)  # the first call only primes the counter
        topic = self.topics.telemetry(self.agent_id)
        while not self._stop.is_set():
            try:
                telemetry = await asyncio.to_thread(self._sample) if self._gpu_monitor else self._sample()
                if self.connection is not None and self.connection.connected:
                    self.connection.publish(topic, telemetry, qos=0, queue_if_offline=False)
            except Exception:  # noqa: BLE001 - a telemetry glitch must not stop telemetry
                logger.exception("telemetry failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.telemetry_interval_s)

    async def _probe(self) -> None:
        if self.hardware is None:
            try:
                self.hardware = await in_daemon_thread(probe_hardware, self.profile)
            except Exception as error:  # noqa: BLE001 - publish what we can, never crash
                logger.exception("hardware probe failed")
                self.hardware = Hardware(hostname=self.hostname, cpu_brand=f"probe failed: {error}"[:200])
        self.hardware = self.hardware.model_copy(update={"hostname": self.hardware.hostname or self.hostname})
        logger.info("hardware%s: %s, %s cores, %s GB RAM, GPUs: %s", " (declared)" if self.hardware.declared else "",
                    self.hardware.cpu_brand, self.hardware.cpu_physical_cores, self.hardware.ram_total_gb,
                    ", ".join(f"{gpu.name} {gpu.vram_total_gb} GB" for gpu in self.hardware.gpus) or "none")
        self.publish_hardware()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Run until :meth:`request_stop` (or a fatal MQTT error); returns the exit code."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        settings = self.settings
        self.jobs = JobRunner(
            backend=self.backend,
            publish=self._publish_result,
            agent_id=self.agent_id,
            max_parallel=self.max_parallel,
            max_queue=settings.max_queue,
            chunk_interval_s=settings.chunk_interval_ms / 1000,
            chunk_max_tokens=settings.chunk_max_tokens,
            stall_timeout_s=settings.stall_timeout_s,
            keep_alive=settings.keep_alive if self.backend.name == "ollama" else None,
            remembered_jobs=settings.remembered_jobs,
            stats_window_s=settings.stats_window_s,
            check_model=self._check_model,
            on_finished=self._on_job_finished,
            on_backend_unreachable=self._on_job_unreachable,
        )
        jobs = self.jobs
        self.monitor = BackendMonitor(self.backend, interval_s=settings.backend_check_interval_s,
                                      retry_max_s=settings.backend_retry_max_s, on_change=self._on_backend_change,
                                      on_models=self._on_local_models, streaming=jobs.streaming,
                                      idle=lambda: jobs.slots.busy == 0, refresh=self._refresh_while_idle)
        self.models = ModelManager(
            self.backend,
            publish=self._publish_model_state,
            wait_backend_up=self.monitor.wait_reachable,
            report_unreachable=self.monitor.report_unreachable,
            on_benchmark=self._on_benchmark,
            keep_alive=settings.keep_alive,
            benchmark_tokens=settings.benchmark_tokens,
            exclusive=jobs.slots.exclusive,
            measure_runtime=self.runtime.measure,
            fragile=lambda: self.runtime.fragile,
        )
        self.operations = ModelOperations(self.backend, publish=self._publish_operation,
                                          after_change=self._refresh_inventory, keep_alive=settings.keep_alive)
        if not self.backend.simulated:
            self._gpu_monitor = await in_daemon_thread(GpuMonitor)
        await self.monitor.check()  # know the backend's state (and its models) before the birth message says it
        if self.monitor.reachable:
            with contextlib.suppress(BackendError):  # retried by _learn_runtime once the runtime answers
                await self.runtime.detect()
        status_topic = self.topics.status(self.agent_id)
        self.connection = MqttConnection(
            settings,
            # Stable client id: a second process with the same agent id takes the session over (and the two
            # visibly fight in their logs) instead of both silently answering the same jobs. Clusters on other
            # topic prefixes (one broker, several clusters or test runs) get their own ids.
            agent_client_id(self.agent_id, self.topics.prefix),
            on_message=self._on_message,
            # Exact topics, not control/<id>/+: some brokers replay retained messages only to exact subscriptions.
            subscriptions=[(topic, 1) for topic in self.topics.controls_of(self.agent_id)]
            + [(self.topics.coordinator_status(), 1)],
            will=OutboundMessage.of(status_topic, self._status("offline")),
            birth=self._birth,
            on_ready=self._on_connected,
            on_fatal=self._on_fatal,
            loop=loop,
        )
        logger.info("agent %s (%s backend at %s%s), max %d parallel jobs", self.agent_id, self.backend.name,
                    self.backend.url or "-", ", SIMULATED" if self.backend.simulated else "", self.max_parallel)
        settle_heap("start-up")  # broker/heap.py: no full collection pass in the middle of a job later
        self.connection.start()
        tasks = [
            loop.create_task(self._probe(), name="probe"),
            loop.create_task(self.monitor.run(), name="backend-monitor"),
            loop.create_task(self._telemetry_loop(), name="telemetry"),
            loop.create_task(self._learn_runtime(), name="runtime-profile"),
        ]
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(tasks)
        return self.exit_code

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        logger.info("agent %s stopping", self.agent_id)
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None
        if self.jobs is not None:
            await self.jobs.shutdown()
        if self.operations is not None:
            await self.operations.shutdown()
        if self._refresh_task is not None:
            tasks.append(self._refresh_task)
        for task in tasks:
            task.cancel()
        if self.models is not None:
            tasks.extend(self.models.cancel_all())
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.connection is not None and not self._killed:
            final = OutboundMessage.of(self.topics.status(self.agent_id), self._status("offline"))
            await asyncio.to_thread(self.connection.stop, final, 2.0)
        with contextlib.suppress(Exception):
            await self.backend.close()
        if self._gpu_monitor is not None:
            self._gpu_monitor.close()

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish (safe from any thread and from signal handlers)."""
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            stop.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    def kill(self) -> None:
        """Drop the MQTT connection without a goodbye, so the broker sends the will (crash drills)."""
        self._killed = True
        if self.connection is not None:
            self.connection.kill()
        self.request_stop()

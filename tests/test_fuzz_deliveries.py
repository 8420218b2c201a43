"""Duplicated and reordered deliveries (issue 8.4): every job runs once, every chunk counts once.

QoS 1 delivers at least once, and a reconnect can replay or reorder. Two
hypothesis state machines drive the real message handlers without a broker:

* the agent's job intake (:class:`agent.jobs.JobRunner`): jobs, their QoS 1
  duplicates, late replays and cancels in any order — each job reaches the
  backend at most once and is answered with exactly one final chunk, with
  gap-free sequence numbers;
* the coordinator's result handling (``Coordinator._on_message`` → the
  reorder buffer → the caller's stream): an answer's chunks duplicated and in
  any order, chunks spoofed by another agent, the answering agent dying and
  another continuing (with or without echoing the partial answer), and its
  late chunks arriving after that — the caller always sees a prefix of the
  answer, never a repeat, and at the end exactly the answer.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.backends import BackendHealth, ChatDelta, ChatDone
from agent.jobs import JobRunner
from broker.coordinator.contract import QueryEvent, QueryFinished, QueryRequest, TextDelta
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage
from broker.protocol import (
    ChatMessage,
    Hardware,
    Job,
    ModelState,
    Result,
    ResultStats,
    RuntimeProfile,
    Status,
    Telemetry,
    decode,
    encode,
)

MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None, database=None,
                            suppress_health_check=list(HealthCheck))
MODEL = "llama3.2:3b"


def settle(loop: asyncio.AbstractEventLoop, rounds: int = 30) -> None:
    """Let every task that can make progress do so (no timers are involved)."""
    async def spin() -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)

    loop.run_until_complete(spin())


# ---------------------------------------------------------------------------- the agent's job intake


class CountingBackend:
    """Answers instantly; counts how often each job (named by its prompt) reaches it."""

    name = "counting"
    url = "counting://"
    simulated = True

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def health(self) -> BackendHealth:
        return BackendHealth(True)

    async def list_models(self) -> list[str]:
        return [MODEL]

    async def chat(self, model: str, messages: list[ChatMessage], options: dict[str, Any] | None = None,
                   assistant_prefix: str | None = None, keep_alive: str | None = None) -> AsyncIterator[object]:
        self.calls[messages[-1].content] += 1
        for index in range(int((options or {}).get("num_predict", 3))):
            await asyncio.sleep(0)
            yield ChatDelta(f" t{index}")
        yield ChatDone("stop", 1, 3, None, None)


class AgentIntake(RuleBasedStateMachine):
    """Jobs, duplicates, replays and cancels against one JobRunner."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.backend = CountingBackend()
        self.results: list[Result] = []
        self.runner = JobRunner(
            backend=self.backend, publish=self.results.append, agent_id="agent", max_parallel=2, max_queue=64,
            chunk_interval_s=0, chunk_max_tokens=1, stall_timeout_s=60, keep_alive=None, remembered_jobs=256,
            stats_window_s=60, check_model=lambda model: None,
        )
        self.submitted: set[str] = set()
        self.counter = 0

    def _call(self, function: Any, *args: Any) -> None:
        async def inside() -> None:
            function(*args)

        self.loop.run_until_complete(inside())

    @rule(target=jobs, tokens=st.integers(1, 4))
    def new_job(self, tokens: int) -> Job:
        self.counter += 1
        job = Job(request_id=f"job{self.counter}", model=MODEL, messages=[ChatMessage(role="user",
                  content=f"job{self.counter}")], options={"num_predict": tokens}, deadline=time.time() + 600)
        self._call(self.runner.submit, job)
        self.submitted.add(job.request_id)
        return job

    @rule(job=jobs)
    def redeliver(self, job: Job) -> None:
        """QoS 1 at-least-once: the same job again, maybe long after it finished."""
        self._call(self.runner.submit, job)

    @rule(job=jobs)
    def redeliver_as_bytes(self, job: Job) -> None:
        """The same duplicate, decoded from the wire like the agent does."""
        self._call(self.runner.submit, decode(Job, encode(job)))

    @rule(job=jobs)
    def cancel(self, job: Job) -> None:
        self._call(self.runner.cancel, job.request_id, "fuzz")

    @rule(rounds=st.integers(1, 20))
    def run_for_a_while(self, rounds: int) -> None:
        settle(self.loop, rounds)

    @invariant()
    def nothing_runs_twice(self) -> None:
        repeated = {name: count for name, count in self.backend.calls.items() if count > 1}
        assert not repeated, f"jobs reached the backend more than once: {repeated}"

    @invariant()
    def at_most_one_final_chunk_and_no_repeated_seq(self) -> None:
        by_request: dict[str, list[Result]] = collections.defaultdict(list)
        for result in self.results:
            by_request[result.request_id].append(result)
        for request_id, chunks in by_request.items():
            assert sum(1 for chunk in chunks if chunk.done) <= 1, f"{request_id}: several final chunks"
            assert [chunk.seq for chunk in chunks] == list(range(len(chunks))), f"{request_id}: seq {chunks}"

    def teardown(self) -> None:
        try:
            deadline = time.monotonic() + 10
            while (self.runner.running or self.runner.queued) and time.monotonic() < deadline:
                settle(self.loop, 50)
            finals = {result.request_id for result in self.results if result.done}
            assert finals == self.submitted, f"unanswered: {self.submitted - finals}"
            self.nothing_runs_twice()
            self.at_most_one_final_chunk_and_no_repeated_seq()
        finally:
            self.loop.close()


AgentIntake.TestCase.settings = MACHINE_SETTINGS
TestAgentIntake = AgentIntake.TestCase


# ---------------------------------------------------------------------------- the coordinator's result handling


class RecordingConnection:
    """Stands in for MqttConnection: keeps what the coordinator publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.connected = True

    def publish(self, topic: str, payload: object, **_: object) -> None:
        self.published.append((topic, payload if isinstance(payload, bytes) else encode(payload)))  # type: ignore[arg-type]

    def jobs(self) -> list[tuple[str, Job]]:
        return [(topic, decode(Job, payload)) for topic, payload in self.published if topic.endswith("/job")]


class CoordinatorResults(RuleBasedStateMachine):
    """One query; its result chunks arrive duplicated, reordered, spoofed, late, and across a failover."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.coordinator = Coordinator(CoordinatorSettings(
            replan_debounce_s=1e6, stall_first_token_s=1e4, stall_between_chunks_s=1e4, admission_wait_s=5,
            default_deadline_s=1e5, attempt_deadline_s=1e5))
        self.coordinator._loop = self.loop
        self.connection = RecordingConnection()
        self.coordinator._connection = self.connection  # type: ignore[assignment]
        self.events: list[QueryEvent] = []
        self.tokens: list[str] = []
        self.plans: dict[str, tuple[str, list[list[str]]]] = {}  # agent → (wire id, its chunks)
        self.delivered: dict[str, set[int]] = {}
        self.serving = "a"
        self.prefix_tokens = 0
        self.killed = False
        self.echo = False

    def _deliver(self, agent_id: str, result: Result) -> None:
        self.coordinator._on_message(InboundMessage(self.coordinator.topics.result(agent_id), encode(result), 1,
                                                    False))
        settle(self.loop)

    def _ready(self, agent_id: str, speed: float) -> None:
        topics = self.coordinator.topics
        runtime = RuntimeProfile(kind="ollama", slots=4, continues_prefill=True)  # failover continues the answer
        for topic, message in ((topics.status(agent_id), Status(state="online", max_parallel=4, runtime=runtime)),
                               (topics.hardware(agent_id), Hardware(cpu_physical_cores=8, ram_total_gb=32)),
                               (topics.model(agent_id), ModelState(model=MODEL, state="ready")),
                               (topics.telemetry(agent_id), Telemetry(tokens_per_s=speed, ttft_s=0.1))):
            self.coordinator._on_message(InboundMessage(topic, encode(message), 1, False))

    def _chunk(self, agent_id: str, index: int) -> Result:
        wire_id, chunks = self.plans[agent_id]
        last = index == len(chunks) - 1
        return Result(request_id=wire_id, seq=index, delta="".join(chunks[index]), done=last, agent_id=agent_id,
                      stats=ResultStats(output_tokens=len(self.tokens)) if last else None)

    def _released(self, agent_id: str) -> int:
        """How many of ``agent_id``'s chunks are in order so far."""
        done = self.delivered[agent_id]
        count = 0
        while count in done:
            count += 1
        return count

    @staticmethod
    def _split(tokens: list[str], cuts: list[int]) -> list[list[str]]:
        points = sorted({cut % (len(tokens) + 1) for cut in cuts} | {0, len(tokens)})
        chunks = [tokens[start:end] for start, end in zip(points, points[1:], strict=False) if end > start]
        return chunks or [[]]

    @initialize(words=st.lists(st.sampled_from(["alpha", "beta", "gamma", "de", "e", "alphabet"]), min_size=2,
                               max_size=12), cuts=st.lists(st.integers(0, 12), max_size=6))
    def start(self, words: list[str], cuts: list[int]) -> None:
        self.tokens = [words[0], *(" " + word for word in words[1:])]
        self._ready("a", 100)
        self._ready("b", 10)

        async def consume() -> None:
            async for event in self.coordinator.query(QueryRequest(messages=[ChatMessage(role="user",
                                                                                             content="q")])):
                self.events.append(event)

        self.task = self.loop.create_task(consume())
        settle(self.loop)
        ((topic, job),) = self.connection.jobs()
        assert topic == self.coordinator.topics.job("a")
        self.plans["a"] = (job.request_id, self._split(self.tokens, cuts))
        self.delivered["a"] = set()

    @property
    def streamed(self) -> str:
        return "".join(event.text for event in self.events if isinstance(event, TextDelta))

    @property
    def finished(self) -> bool:
        return any(isinstance(event, QueryFinished) for event in self.events)

    @rule(data=st.data())
    def deliver_serving(self, data: st.DataObject) -> None:
        """A chunk of the serving agent's answer: any of them, again or out of order."""
        _, chunks = self.plans[self.serving]
        index = data.draw(st.integers(0, len(chunks) - 1))
        self.delivered[self.serving].add(index)
        self._deliver(self.serving, self._chunk(self.serving, index))

    @precondition(lambda self: self.killed)
    @rule(data=st.data())
    def late_chunk_from_the_dead_agent(self, data: st.DataObject) -> None:
        _, chunks = self.plans["a"]
        self._deliver("a", self._chunk("a", data.draw(st.integers(0, len(chunks) - 1))))

    @rule(seq=st.integers(0, 12))
    def spoofed_chunk(self, seq: int) -> None:
        """Another agent answering for the serving agent's job: ignored."""
        wire_id, _ = self.plans[self.serving]
        self._deliver("mallory", Result(request_id=wire_id, seq=seq, delta=" SPOOF", done=seq % 2 == 0))

    @precondition(lambda self: not self.killed and not self.finished)
    @rule(echo=st.booleans(), cuts=st.lists(st.integers(0, 12), max_size=6))
    def serving_agent_dies(self, echo: bool, cuts: list[int]) -> None:
        """The will arrives: b continues from what a delivered in order, maybe repeating it first."""
        _, chunks_a = self.plans["a"]
        released = self._released("a")
        self.prefix_tokens = sum(len(chunk) for chunk in chunks_a[:released])
        self.coordinator._on_message(InboundMessage(self.coordinator.topics.status("a"),
                                                    encode(Status(state="offline")), 1, True))
        settle(self.loop)
        self.killed = True
        (topic, job) = self.connection.jobs()[-1]
        assert topic == self.coordinator.topics.job("b"), self.connection.jobs()
        prefix = "".join(self.tokens[:self.prefix_tokens])
        assert (job.assistant_prefix or "") == prefix
        self.echo = echo and bool(prefix)
        rest = self.tokens if self.echo else self.tokens[self.prefix_tokens:]
        self.plans["b"] = (job.request_id, self._split(rest, cuts))
        self.delivered["b"] = set()
        self.serving = "b"

    @invariant()
    def caller_sees_exactly_the_answer_so_far(self) -> None:
        full = "".join(self.tokens)
        streamed = self.streamed
        assert full.startswith(streamed), f"streamed {streamed!r} is not a prefix of {full!r}"
        if not self.plans:
            return
        _, chunks = self.plans[self.serving]
        released = "".join("".join(chunk) for chunk in chunks[:self._released(self.serving)])
        if self.serving == "a":
            assert streamed == released
        else:  # what a delivered, then b's text without the echo of it
            prefix = "".join(self.tokens[:self.prefix_tokens])
            assert streamed == prefix + (released[len(prefix):] if self.echo else released), (streamed, released)

    def teardown(self) -> None:
        try:
            if self.plans:
                _, chunks = self.plans[self.serving]
                for index in range(len(chunks)):
                    self._deliver(self.serving, self._chunk(self.serving, index))
                self.loop.run_until_complete(asyncio.wait_for(self.task, 5))
                final = self.events[-1]
                full = "".join(self.tokens)
                assert isinstance(final, QueryFinished), final
                assert final.text == full and self.streamed == full, (final.text, self.streamed, full)
        finally:
            self.loop.close()


CoordinatorResults.TestCase.settings = MACHINE_SETTINGS
TestCoordinatorResults = CoordinatorResults.TestCase

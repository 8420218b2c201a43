"""What is known about one answer, and how it is reported: stats, provenance, simulated agents.

:class:`AnswerRecord` is folded from the coordinator's events by the
answer's stream (app/answer_stream.py), once; the UI, the script API and the
HTTP APIs read it through the functions here, so "who answered" looks the
same everywhere. Which agents are simulated is read from a cluster snapshot
when an answer is reported, never remembered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.coordinator.contract import (
    AgentAnswer,
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    AnswerRestarted,
    ClusterSnapshot,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryStarted,
    TextDelta,
)
from broker.protocol.messages import ToolCall

STOPPED = "stopped"
CHARS_PER_TOKEN = 4
"""Rough characters per token, for an answer whose tokens nobody counted (no stats and no streamed pieces)."""
"""The error text of an answer that ended without a final event (stopped by its reader or the app)."""


@dataclass
class AnswerRecord:
    """What is known about an answer while it streams; becomes the stored message."""

    text: str = ""
    agents: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    agent_texts: dict[str, str] = field(default_factory=dict)
    agent_models: dict[str, str] = field(default_factory=dict)
    finished: QueryFinished | None = None
    failed: QueryFailed | None = None
    switches: list[AgentSwitched] = field(default_factory=list)
    restarts: list[AnswerRestarted] = field(default_factory=list)
    """Failovers that started the answer over: ``text`` then holds only the new answer."""
    pieces: int = 0
    """Text pieces streamed for the current answer (a token each, for most runtimes): the count of last resort."""
    stopped: bool = False
    """Ended without a final event: its reader stopped it, or the app did (``failed`` then says "stopped")."""
    tried: list[str] = field(default_factory=list)
    """Every agent the cluster gave this answer to, in order (failed ones included); ``agents``: whose text it is."""
    tried_models: list[str] = field(default_factory=list)
    """The models of :attr:`tried`, each once, in order."""
    affinity: bool = False
    """Routing chose the agent because it holds this conversation's previous turn in its prompt cache."""
    pinned: bool = False
    """The caller named the agent; routing did not choose."""

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.failed is not None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The function calls of the finished answer (docs/api.md "Tools")."""
        return list(self.finished.tool_calls) if self.finished is not None else []

    def _tried(self, agents: list[str], models: list[str]) -> None:
        self.tried.extend(agent for agent in agents if agent and agent not in self.tried)
        self.tried_models.extend(model for model in models if model and model not in self.tried_models)

    def apply(self, event: QueryEvent) -> None:
        """Fold one event into the record."""
        self._note_tried(event)
        if isinstance(event, QueryStarted):
            self.agents, self.models = list(event.agents), list(event.models)
            self.affinity, self.pinned = event.affinity, event.pinned
        elif isinstance(event, TextDelta):
            self.text += event.text
            self.pieces += 1 if event.text else 0
            if event.agent_id and event.agent_id not in self.agents:
                self.agents.append(event.agent_id)
        elif isinstance(event, AgentSwitched):
            self.switches.append(event)
            if event.to_agent not in self.agents:
                self.agents.append(event.to_agent)
        elif isinstance(event, AnswerRestarted):
            self.restarts.append(event)
            self.text, self.pieces = "", 0
            if event.to_agent not in self.agents:
                self.agents.append(event.to_agent)
        elif isinstance(event, AgentDelta):
            self.agent_texts[event.agent_id] = self.agent_texts.get(event.agent_id, "") + event.text
            self.agent_models[event.agent_id] = event.model
        elif isinstance(event, AgentFinished):
            answer = event.answer
            self.agent_texts[answer.agent_id] = answer.text
            self.agent_models[answer.agent_id] = answer.model
        elif isinstance(event, QueryFinished):
            self.finished = event
            self.text = event.text
            self.agents, self.models = list(event.agents), list(event.models)
        elif isinstance(event, QueryFailed):
            self.failed = event
            if event.partial_text and len(event.partial_text) >= len(self.text):
                self.text = event.partial_text

    def _note_tried(self, event: QueryEvent) -> None:
        if isinstance(event, QueryStarted | QueryFinished):
            self._tried(list(event.agents), list(event.models))
            if isinstance(event, QueryFinished):
                self._tried([answer.agent_id for answer in event.answers], [answer.model for answer in event.answers])
        elif isinstance(event, TextDelta | AgentDelta):
            self._tried([event.agent_id], [event.model])
        elif isinstance(event, AgentSwitched | AnswerRestarted):
            self._tried([event.from_agent, event.to_agent], [event.model])
        elif isinstance(event, AgentFinished):
            self._tried([event.answer.agent_id], [event.answer.model])

    @property
    def outcome(self) -> Outcome:
        """How the answer ended, as it is stored: ``ok``, ``error`` or ``stopped`` (see :class:`Outcome`)."""
        if self.finished is not None:
            return Outcome("ok", None, list(self.agents), list(self.models))
        if self.stopped or (self.failed is not None and self.failed.code == "cancelled"):
            # What arrived before the stop is the work of the agents that streamed it.
            wrote = list(self.agents) if self.text else []
            return Outcome("stopped", self.failed.error if self.failed else STOPPED, wrote, list(self.models))
        error = self.failed.error if self.failed is not None else "the answer ended without a result"
        # A failed answer was answered by nobody: the agents go to ``tried`` only (issue 14.4).
        return Outcome("error", error, [], list(self.tried_models or self.models))

    def stop(self, request_id: str) -> None:
        """The stream ended without a final event: the answer was stopped, and keeps the text it has."""
        if not self.ended:
            self.stopped = True
            self.failed = QueryFailed(request_id=request_id, error=STOPPED, code="cancelled", partial_text=self.text)


@dataclass(frozen=True)
class Outcome:
    """How an answer ended, as the chat stores it (app/store/sessions.py ``ChatMessage``)."""

    status: str
    """``ok`` (finished), ``error`` (failed: ``error`` says why) or ``stopped`` (by the user or the app)."""
    error: str | None
    agents: list[str]
    """Whose text the answer is: empty for a failed answer, whoever streamed the partial text of a stopped one."""
    models: list[str]
    """The answer's models; for a failed answer, the models that were tried."""


def restart_note(event: AnswerRestarted) -> str:
    """The sentence every surface shows when a failover started the answer over (plain text, not escaped)."""
    reason = event.reason.removeprefix(f"{event.from_agent}: ")
    return (f"answer restarted on {event.to_agent}: {event.from_agent} failed ({reason}); "
            f"its partial answer ({event.discarded_chars} characters) was discarded")


def restart_dict(event: AnswerRestarted) -> dict[str, Any]:
    """A restart as plain JSON (the ``slb`` restart event of the HTTP APIs, stored stats, the script API)."""
    return {
        "from_agent": event.from_agent,
        "to_agent": event.to_agent,
        "model": event.model,
        "reason": event.reason,
        "discarded_chars": event.discarded_chars,
        "note": restart_note(event),
    }


def simulated_agents(snapshot: ClusterSnapshot) -> set[str]:
    """Agents on the simulated backend (demo): their text is not from a real model, and every answer says so."""
    return {agent.id for agent in snapshot.agents if agent.simulated}


def answer_dict(answer: AgentAnswer) -> dict[str, Any]:
    """A fan-out answer as plain JSON."""
    return {
        "agent_id": answer.agent_id,
        "model": answer.model,
        "text": answer.text,
        "error": answer.error,
        "simulated": answer.simulated,
        "stats": answer.stats.model_dump(exclude_none=True) if answer.stats is not None else {},
    }


def fan_out_answers(record: AnswerRecord, simulated: set[str]) -> list[dict[str, Any]]:
    """Every agent's answer of a fan-out: the final ones when the query finished, else what arrived so far."""
    finished = record.finished
    if finished is not None and finished.answers:
        return [answer_dict(answer) for answer in finished.answers]
    return [
        {"agent_id": agent, "model": record.agent_models.get(agent), "text": text, "simulated": agent in simulated}
        for agent, text in record.agent_texts.items()
    ]


def stats_of(record: AnswerRecord, simulated: set[str]) -> dict[str, Any]:
    """The stats stored with an answer (and shown under it)."""
    stats: dict[str, Any] = {}
    finished = record.finished
    if finished is not None:
        if finished.stats is not None:
            stats.update(finished.stats.model_dump(exclude_none=True))
        if finished.latency_s is not None:
            stats["latency_s"] = round(finished.latency_s, 3)
        if finished.failovers:
            stats["failovers"] = finished.failovers
        if finished.aggregation is not None:
            stats["aggregation"] = finished.aggregation
        if finished.agreement is not None:
            stats["agreement"] = round(finished.agreement, 3)
        if finished.combined_by:
            stats["combined_by"] = finished.combined_by
        if finished.answers:
            stats["answers"] = [answer_dict(answer) for answer in finished.answers]
    if record.failed is not None:
        stats["error"] = record.failed.error
        stats["error_code"] = record.failed.code
    if record.switches:
        stats["switches"] = [
            {"from": switch.from_agent, "to": switch.to_agent, "reason": switch.reason} for switch in record.switches
        ]
    if record.restarts:
        stats["restarts"] = [restart_dict(restart) for restart in record.restarts]
    marked = sorted(agent for agent in record.agents if agent in simulated)
    if marked:
        stats["simulated_agents"] = marked
    if record.affinity:
        stats["affinity"] = True
    if record.pinned:
        stats["pinned"] = True
    return stats


def provenance(record: AnswerRecord, mode: str, simulated: set[str]) -> dict[str, Any]:
    """Who answered, for the ``slb`` field of the OpenAI and Ollama responses."""
    finished = record.finished
    data: dict[str, Any] = {
        "mode": mode,
        "agents": record.agents,
        "models": record.models,
        "simulated_agents": sorted(set(record.agents) & simulated),
        "affinity": record.affinity,
        "pinned": record.pinned,
    }
    if finished is not None:
        data["failovers"] = finished.failovers
        data["latency_s"] = finished.latency_s
        data["finish_reason"] = finish_reason(record)
        data["tokens_counted_by"] = token_counts(record).counted_by
        if finished.answers:
            data["aggregation"] = finished.aggregation
            data["agreement"] = finished.agreement
            data["answers"] = [answer_dict(answer) for answer in finished.answers]
    if record.restarts:
        data["restarts"] = [restart_dict(restart) for restart in record.restarts]
    return data


def finish_reason(record: AnswerRecord) -> str:
    """Why a finished answer ended, in the runtime's own word (``stop``, ``length``, …).

    ``stop`` only when the runtime said so, or said nothing about an answer the agent judged complete (runtimes
    that report no reason; an answer cut short is a ``truncated`` failure, never a finished answer).
    """
    finished = record.finished
    stats = finished.stats if finished is not None else None
    return stats.finish_reason if stats is not None and stats.finish_reason else "stop"


@dataclass(frozen=True)
class TokenCounts:
    """The token counts the APIs report (OpenAI ``usage``, Ollama ``prompt_eval_count`` / ``eval_count``)."""

    prompt_tokens: int
    output_tokens: int
    counted_by: str
    """runtime (its own usage), agent (the runtime sent none; the agent counted streamed pieces), or app (neither
    came: the app counted the pieces it received, or estimated from the text when no piece arrived)."""


def token_counts(record: AnswerRecord) -> TokenCounts:
    """The runtime's counts, or the agent's; never 0 output tokens for a non-empty answer."""
    finished = record.finished
    stats = finished.stats if finished is not None else None
    prompt = stats.prompt_tokens if stats is not None and stats.prompt_tokens is not None else 0
    output = stats.output_tokens if stats is not None and stats.output_tokens is not None else 0
    counted_by = (stats.tokens_counted_by if stats is not None else None) or "runtime"
    if output == 0 and record.text:
        output = record.pieces or max(1, round(len(record.text) / CHARS_PER_TOKEN))
        counted_by = "app"
    return TokenCounts(prompt, output, counted_by)


def usage_numbers(record: AnswerRecord) -> dict[str, Any]:
    """Token counts and timings of a finished answer, None when unknown (the APIs' usage fields)."""
    finished = record.finished
    stats = finished.stats if finished is not None else None
    counts = token_counts(record)
    return {
        "prompt_tokens": counts.prompt_tokens,
        "output_tokens": counts.output_tokens,
        "tokens_counted_by": counts.counted_by,
        "tokens_per_s": stats.tokens_per_s if stats else None,
        "ttft_s": stats.ttft_s if stats else None,
        "latency_s": finished.latency_s if finished else None,
    }

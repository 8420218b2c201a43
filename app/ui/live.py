"""The answer being streamed into the chat: what the chat bubble and the agent cards show meanwhile.

The answer's text, agents and final result come from the stream's
:class:`~app.answers.AnswerRecord` (folded once, by the stream); this keeps
only what the live view adds: the routing note, each agent's state and
speed during a fan-out, and the agents found to be simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.answer_stream import AnswerStream
from app.answers import AnswerRecord, restart_note, stats_of
from app.store import Citation
from app.ui.render import Message, agent_card_html, agent_label, answer_messages, answers_panel_html
from broker.coordinator.contract import (
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    AnswerRestarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryStarted,
    RoutingMode,
)


@dataclass
class LiveAnswer:
    """An answer while it streams: renders the chat bubble and the agent cards from the stream's record."""

    mode: str
    simulated: set[str]
    record: AnswerRecord = field(default_factory=AnswerRecord)
    citations: list[Citation] = field(default_factory=list)
    agent_status: dict[str, str] = field(default_factory=dict)
    agent_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str | None = "routing…"

    def follow(self, answer: AnswerStream) -> None:
        """Show this stream's answer (until the question is asked, the view shows only "routing…")."""
        self.record = answer.record
        self.citations = answer.citations

    def apply(self, event: QueryEvent) -> None:
        """Update what the live view adds to the record for one event the stream delivered."""
        if isinstance(event, QueryStarted):
            labels = [
                agent_label(agent, event.models[i] if i < len(event.models) else None, agent in self.simulated)
                for i, agent in enumerate(event.agents)
            ]
            self.note = (
                f"asking {len(event.agents)} agents: {', '.join(labels)}" if len(event.agents) > 1
                else f"answering on {', '.join(labels)}"
            )
            for agent in event.agents:
                self.agent_status.setdefault(agent, "waiting")
        elif isinstance(event, AgentSwitched):
            successor = agent_label(event.to_agent, event.model, event.to_agent in self.simulated)
            self.note = f"{event.from_agent} failed ({event.reason}); {successor} continues"
        elif isinstance(event, AnswerRestarted):
            self.note = restart_note(event)  # the record already dropped the partial text
        elif isinstance(event, AgentDelta):
            self.agent_status[event.agent_id] = "answering"
        elif isinstance(event, AgentFinished):
            answer = event.answer
            if answer.simulated:
                self.simulated.add(answer.agent_id)
            self.agent_status[answer.agent_id] = f"failed: {answer.error}" if answer.error else "done"
            if answer.stats is not None:
                self.agent_stats[answer.agent_id] = answer.stats.model_dump(exclude_none=True)
        elif isinstance(event, QueryFinished | QueryFailed):
            self.note = None

    @property
    def fan_out(self) -> bool:
        return bool(self.record.agent_texts) or self.mode == RoutingMode.ALL

    def messages(self, *, done: bool = False) -> list[Message]:
        """The answer's bubble (and its blocks); during a fan-out the bubble holds every agent's card, so each
        answer streams right where the combined one will land."""
        record = self.record
        finished = done or record.ended
        text = record.text
        status = self.note if not finished else None
        live_html = ""
        if not finished and self.fan_out and not text:
            status = self.note or "asking every agent…"
            live_html = self.panel_html()
        return answer_messages(
            text,
            agents=record.agents,
            models=record.models,
            mode=self.mode,
            stats=stats_of(record, self.simulated) if finished else {},
            citations=self.citations if finished else [],
            simulated=self.simulated,
            streaming=not finished,
            status=status,
            live_html=live_html,
            tried=record.tried if finished else None,
        )

    @property
    def failed(self) -> bool:
        """The answer ended in a failure (not a stop): the chat offers Retry."""
        failed = self.record.failed
        return failed is not None and failed.code != "cancelled"

    def panel_html(self) -> str:
        """Side-by-side cards of every agent's answer (fan-out) with the combined result's agreement."""
        record = self.record
        if not self.fan_out and not record.agent_texts:
            return ""
        cards = [
            agent_card_html(
                agent,
                record.agent_models.get(agent),
                self.agent_status.get(agent, ""),
                self.agent_stats.get(agent, {}),
                record.agent_texts.get(agent, ""),
                agent in self.simulated,
            )
            for agent in dict.fromkeys([*self.agent_status, *record.agent_texts])
        ]
        finished = record.finished
        return answers_panel_html(
            cards,
            finished.aggregation if finished is not None else None,
            finished.agreement if finished is not None else None,
        )

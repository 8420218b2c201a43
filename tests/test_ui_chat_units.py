"""The chat tab's pure parts (issue 14): the quiet notice, failed answers, the machine picker, the settings label."""

from __future__ import annotations

import time

from app.store import ChatMessage
from app.ui.chat_parts import ANY_MACHINE, machine_choices, notice_line, settings_summary
from app.ui.render import answer_messages, history_messages, notice_html
from broker.coordinator.contract import AgentView, ClusterSnapshot
from broker.mqtt.settings import BrokerAddress

BROKER = BrokerAddress(host="127.0.0.1", port=1883, tls=False)


def _agent(agent_id: str, **fields: object) -> AgentView:
    defaults: dict[str, object] = {"online": True, "model": "llama3.2:1b", "model_state": "ready"}
    defaults.update(fields)
    return AgentView(id=agent_id, **defaults)  # type: ignore[arg-type]


def _snapshot(*agents: AgentView, connected: bool = True) -> ClusterSnapshot:
    ready = sorted({agent.model for agent in agents if agent.model and agent.model_state == "ready"})
    return ClusterSnapshot(agents=list(agents), ready_models=ready, connected=connected, generated_at=time.time(),
                           servable_models=ready)


def test_the_notice_is_one_line_with_the_advice_folded_under_it() -> None:
    snapshot = _snapshot(_agent("desk"), _agent("pi", simulated=True),
                         _agent("laptop", model_state="failed", backend="ollama", backend_reachable=False,
                                backend_url="http://127.0.0.1:11434"))
    line, detail, healthy = notice_line(snapshot, BROKER)
    assert line == "2 of 3 machines ready · 1 simulated · details in Cluster" and healthy
    assert "\n" not in line and "ollama.com" in detail, "the advice is kept, behind the line"
    html = notice_html(line, detail, healthy)
    assert html.startswith('<details class="slb-notice-line">') and "<summary>" in html
    line, detail, healthy = notice_line(_snapshot(), BROKER)
    assert line == "No machine connected yet · how to add one" and not healthy and "ollama.com" in detail
    assert notice_line(_snapshot(connected=False), BROKER)[0].startswith("Not connected to the broker")
    assert "<b>" not in notice_html("<b>x</b>", "<img src=x>", False), "agents' words are escaped"


def test_a_failed_answer_says_where_it_failed_and_how_to_retry() -> None:
    live = answer_messages("", agents=["desk"], models=["m"], mode="auto",
                           stats={"error": "gave up after 2 attempts", "error_code": "failed",
                                  "switches": [{"from": "pi", "to": "desk", "reason": "x"}]},
                           citations=[], simulated=set())
    content = live[0]["content"]
    assert "failed on pi, desk ·" in content and "answered by" not in content
    assert "tried: pi, desk" in content and "Retry" in content and "gave up after 2 attempts" in content
    stored = ChatMessage(id=2, session_id="s", role="assistant", content="", created_at=time.time(), agents=[],
                         models=["m"], mode="auto", status="error", error="no agent serves m", tried=["gpu-box"])
    question = ChatMessage(id=1, session_id="s", role="user", content="hi", created_at=time.time())
    reopened = history_messages([question, stored])
    assert "failed on gpu-box" in reopened[1]["content"] and "no agent serves m" in reopened[1]["content"]
    stopped = stored.model_copy(update={"status": "stopped", "error": "stopped", "content": "part"})
    assert "(stopped)" in history_messages([stopped])[0]["content"]
    assert "Failed" not in history_messages([stopped])[0]["content"]


def test_machine_picker_lists_ready_machines_and_keeps_a_saved_one() -> None:
    snapshot = _snapshot(_agent("desk"), _agent("pi", simulated=True), _agent("gone", online=False),
                         _agent("sick", quarantined=True))
    choices = machine_choices(snapshot)
    assert choices == [("any machine", ANY_MACHINE), ("desk (llama3.2:1b)", "desk"),
                       ("pi (llama3.2:1b, simulated)", "pi")]
    assert machine_choices(snapshot, keep="gone")[-1] == ("gone (not ready)", "gone")


def test_settings_label_says_what_the_chat_uses() -> None:
    assert settings_summary("auto", None, False, "") == "Chat settings · auto"
    assert settings_summary("all", "desk", True, "be brief") == \
        "Chat settings · all · on desk · documents on · system prompt"

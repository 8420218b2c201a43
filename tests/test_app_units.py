"""Fast tests of the web app's pure parts: throttling, rendering, settings, request models, middleware."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from datetime import datetime

import gradio as gr
import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError

from app import cluster_status
from app.answer_stream import AnswerStream
from app.answers import AnswerRecord, TokenCounts, finish_reason, stats_of, token_counts
from app.api_parameters import ollama_options
from app.errors import BadRequest
from app.gradio_queue import UnreadResults
from app.markup import markdown_html, markdown_literal
from app.middleware import BodyLimitMiddleware, BodyLimits, route_label
from app.model_list import find_listed, listed_models, valid_model_name
from app.ollama_models import PullProgress, keep_alive_is_zero
from app.openai_api import ChatCompletionRequest
from app.sampler import ClusterSampler, generating_tokens_per_s
from app.service import CachedBuild
from app.settings import AppSettings
from app.streaming import throttled
from app.throttle import FailureThrottle
from app.ui import ScriptBlocks
from app.ui.chat_parts import mode_choices
from app.ui.cluster_render import (
    PLOT_COLORS,
    agent_colors,
    agents_table_html,
    history_frames,
    legend_html,
    placement_markdown,
    plan_html,
    scores_frame,
)
from app.ui.live import LiveAnswer
from app.ui.render import answer_messages, user_message
from broker.coordinator.contract import (
    AgentAnswer,
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    AgentView,
    AnswerRestarted,
    ClusterSnapshot,
    ManageFinished,
    ManageProgress,
    ManageStarted,
    ModelAvailability,
    ModelHolder,
    PlanEntry,
    PlanView,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.views import agent_view
from broker.protocol.messages import Hardware, ModelState, ResultStats, Status, Telemetry
from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
from broker.scheduling.placement import nothing_placed
from broker.scheduling.registry import AgentRecord
from tests.app_scripted import pull_events

# ---------------------------------------------------------------------------- throttling


async def _ticks(count: int, gap_s: float, log: list[str]) -> AsyncIterator[int]:
    try:
        for index in range(count):
            yield index
            await asyncio.sleep(gap_s)
    finally:
        log.append("closed")


async def test_throttle_delivers_the_first_event_at_once_then_batches() -> None:
    log: list[str] = []
    started = time.monotonic()
    batches: list[tuple[float, list[int]]] = []
    async for batch in throttled(_ticks(40, 0.005, log), 0.1):
        batches.append((time.monotonic() - started, batch))
    assert batches[0][1] == [0] and batches[0][0] < 0.05
    assert [item for _, batch in batches for item in batch] == list(range(40))
    assert len(batches) <= 6, "about 0.2 s of events at 10 updates/s"
    assert log == ["closed"]


async def test_throttle_flushes_pending_events_when_the_source_goes_quiet() -> None:
    async def burst_then_wait() -> AsyncIterator[str]:
        yield "a"
        yield "b"
        await asyncio.sleep(1.0)
        yield "c"

    started = time.monotonic()
    seen: list[tuple[float, list[str]]] = []
    async for batch in throttled(burst_then_wait(), 0.1):
        seen.append((time.monotonic() - started, batch))
    assert seen[0][1] == ["a"]
    assert seen[1][1] == ["b"] and seen[1][0] < 0.3, "'b' must not wait for 'c'"
    assert seen[2][1] == ["c"]


async def test_closing_the_throttle_closes_the_source() -> None:
    log: list[str] = []
    stream = throttled(_ticks(1000, 0.01, log), 0.05)
    async for _ in stream:
        break
    await stream.aclose()
    assert log == ["closed"]


async def test_throttle_passes_errors_on_after_pending_events() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("backend exploded")

    received: list[int] = []
    with pytest.raises(RuntimeError, match="exploded"):
        async for batch in throttled(failing(), 0.05):
            received.extend(batch)
    assert received == [1]


async def test_throttle_ends_when_the_source_is_cancelled_from_elsewhere() -> None:
    """The service stops a query that ignored its cancel by cancelling the task that reads it."""
    holder: dict[str, asyncio.Task[object] | None] = {}

    async def source() -> AsyncIterator[int]:
        holder["task"] = asyncio.current_task()
        yield 1
        await asyncio.sleep(10)
        yield 2

    async def read() -> list[int]:
        received: list[int] = []
        async for batch in throttled(source(), 0.05):
            received.extend(batch)
        return received

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.1)
    task = holder["task"]
    assert task is not None
    task.cancel()
    assert await asyncio.wait_for(reader, 2) == [1]


# ---------------------------------------------------------------------------- answer streams


def _answer(events: AsyncGenerator[QueryEvent, None], closed: list[AnswerStream]) -> AnswerStream:
    async def on_close(stream: AnswerStream) -> None:
        closed.append(stream)

    return AnswerStream(request_id="r9", session_id=None, mode="auto", citations=[], owner=None, events=events,
                        on_close=on_close)


async def test_an_answer_stream_folds_its_record_once_and_ends_once() -> None:
    async def source() -> AsyncGenerator[QueryEvent, None]:
        yield QueryStarted("r9", ["desk"], ["m"], "auto")
        yield TextDelta("r9", "Hello", "desk", "m")
        yield QueryFinished("r9", "Hello", ["desk"], ["m"], "auto")

    closed: list[AnswerStream] = []
    answer = _answer(source(), closed)
    events = [event async for event in answer]
    assert [type(event) for event in events] == [QueryStarted, TextDelta, QueryFinished]
    assert answer.record.text == "Hello" and answer.record.finished is not None
    await answer.aclose()
    assert closed == [answer] and not answer.record.stopped


async def test_closing_an_answer_early_closes_its_query_and_marks_it_stopped() -> None:
    log: list[str] = []

    async def source() -> AsyncGenerator[QueryEvent, None]:
        try:
            yield TextDelta("r9", "partial", "desk", "m")
            await asyncio.sleep(10)
        finally:
            log.append("query closed")

    closed: list[AnswerStream] = []
    answer = _answer(source(), closed)
    async for _ in answer:
        break
    await answer.aclose()
    await answer.aclose()
    assert log == ["query closed"] and closed == [answer]
    failed = answer.record.failed
    assert answer.record.stopped and failed is not None and failed.code == "cancelled"
    assert failed.partial_text == "partial"


async def test_an_answer_whose_event_stream_breaks_is_a_failure_not_a_stop() -> None:
    async def source() -> AsyncGenerator[QueryEvent, None]:
        yield TextDelta("r9", "partial", "desk", "m")
        raise ConnectionError("broker gone")

    closed: list[AnswerStream] = []
    answer = _answer(source(), closed)
    with pytest.raises(ConnectionError):
        async for _ in answer:
            pass
    assert closed == [answer] and not answer.record.stopped
    outcome = answer.record.outcome
    assert outcome.status == "error" and "ConnectionError" in (outcome.error or "") and outcome.agents == []


def test_an_answers_outcome_names_who_answered_and_who_was_tried() -> None:
    """Issue 14.4: a failed answer claims no agent answered it; the agents it went to are in ``tried``."""
    failed = AnswerRecord()
    for event in (QueryStarted("r1", ["pi"], ["small"], "auto"), TextDelta("r1", "Hal", "pi", "small"),
                  AgentSwitched("r1", "pi", "desk", "small", "pi: crashed"),
                  QueryFailed("r1", "desk: timed out", "timeout", "Half")):
        failed.apply(event)
    outcome = failed.outcome
    assert (outcome.status, outcome.error, outcome.agents, outcome.models) == (
        "error", "desk: timed out", [], ["small"])
    assert failed.tried == ["pi", "desk"] and failed.text == "Half"

    finished = AnswerRecord()
    for event in (QueryStarted("r2", ["pi"], ["small"], "auto"),
                  AnswerRestarted("r2", "pi", "desk", "big", "pi: crashed", 3),
                  QueryFinished("r2", "Done", ["desk"], ["big"], "auto")):
        finished.apply(event)
    assert (finished.outcome.status, finished.outcome.agents) == ("ok", ["desk"])
    assert finished.tried == ["pi", "desk"] and finished.tried_models == ["small", "big"]

    stopped = AnswerRecord()
    stopped.apply(QueryStarted("r3", ["pi"], ["small"], "auto"))
    stopped.stop("r3")
    assert (stopped.outcome.status, stopped.outcome.agents) == ("stopped", [])  # nothing written: nobody wrote it
    stopped_late = AnswerRecord()
    stopped_late.apply(TextDelta("r4", "some", "pi", "small"))
    stopped_late.stop("r4")
    assert (stopped_late.outcome.status, stopped_late.outcome.agents) == ("stopped", ["pi"])


# ---------------------------------------------------------------------------- rendering


def _agent(agent_id: str, **fields: object) -> AgentView:
    defaults: dict[str, object] = {"online": True, "score": 50.0, "model": "llama3.2:1b", "model_state": "ready"}
    defaults.update(fields)
    return AgentView(id=agent_id, **defaults)  # type: ignore[arg-type]


def test_every_answer_names_its_agent_model_and_simulated_marker() -> None:
    messages = answer_messages(
        "Paris.",
        agents=["pi"],
        models=["llama3.2:1b"],
        mode="auto",
        stats={"tokens_per_s": 12.0, "latency_s": 1.5},
        citations=[{"number": 1, "document_name": "guide.pdf", "page": 3, "snippet": "<b>Paris</b> is..."}],
        simulated={"pi"},
    )
    assert "answered by pi (llama3.2:1b, simulated)" in messages[0]["content"]
    assert "12 tok/s" in messages[0]["content"]
    sources = messages[-1]
    assert sources["metadata"]["title"] == "Sources (1)"
    assert "guide.pdf" in sources["content"] and "page 3" in sources["content"]
    assert "<b>" not in sources["content"], "document text is escaped"


class _FedLiveAnswer(LiveAnswer):
    """Stands in for the AnswerStream, which folds each event into the record before the live view sees it."""

    def apply(self, event: QueryEvent) -> None:
        self.record.apply(event)
        super().apply(event)


def test_live_answer_fan_out_panel_and_final_message() -> None:
    live = _FedLiveAnswer(mode="all", simulated=set())
    live.apply(QueryStarted("r1", ["desk", "pi"], ["llama3.1:8b", "llama3.2:1b"], "all"))
    live.apply(AgentDelta("r1", "desk", "llama3.1:8b", "Four"))
    live.apply(AgentDelta("r1", "pi", "llama3.2:1b", "4"))
    streaming = live.messages()[0]["content"]
    assert "asking 2 agents" in streaming
    pi = AgentAnswer("pi", "llama3.2:1b", "4", ResultStats(ttft_s=0.2, tokens_per_s=9), simulated=True)
    desk = AgentAnswer("desk", "llama3.1:8b", "Four")
    live.apply(AgentFinished("r1", pi))
    live.apply(AgentFinished("r1", desk))
    live.apply(
        QueryFinished("r1", "Four", ["desk", "pi"], ["llama3.1:8b", "llama3.2:1b"], "all", answers=[desk, pi],
                      aggregation="consensus", agreement=0.75)
    )
    panel = live.panel_html()
    assert panel.count('class="slb-card"') == 2
    assert "simulated" in panel and "agreement <b>0.75</b>" in panel
    final = live.messages()
    assert "agreement 0.75" in final[0]["content"]
    assert "pi (llama3.2:1b, simulated)" in final[0]["content"]
    assert final[1]["metadata"]["title"] == "Every agent's answer (2)"


def test_failed_and_stopped_answers_say_so() -> None:
    live = _FedLiveAnswer(mode="auto", simulated=set())
    live.apply(QueryStarted("r2", ["desk"], ["m"], "auto"))
    live.apply(TextDelta("r2", "partial", "desk", "m"))
    live.apply(QueryFailed("r2", "cancelled by the caller", "cancelled", "partial"))
    assert "(stopped)" in live.messages()[0]["content"]
    record = AnswerRecord()
    record.apply(QueryFailed("r3", "no agent serves llama9", "no_agent"))
    assert stats_of(record, set())["error_code"] == "no_agent"


def test_agents_table_escapes_and_marks_simulated_and_pulling() -> None:
    snapshot = ClusterSnapshot(
        agents=[
            _agent("<script>x</script>", simulated=True),
            _agent("laptop", model_state="pulling", model_progress=0.42, backend_reachable=False,
                   backend_error="connection refused"),
        ],
        ready_models=["llama3.2:1b"],
        connected=True,
        generated_at=time.time(),
    )
    html = agents_table_html(snapshot)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "simulated" in html
    assert 'style="width:42%"' in html and "unreachable" in html
    assert list(scores_frame(snapshot).columns) == ["agent", "part", "points"]


def test_plan_html_and_empty_history_frames() -> None:
    plan = PlanView(
        entries=[PlanEntry("desk", "llama3.2:1b", "llama3.1:8b", True, "score 90 | fits 24 GB")],
        excluded={"pi": "offline"},
        applied=False,
        created_at=time.time(),
    )
    text = plan_html(plan, {"desk"})
    assert "What-if" in text and "<b>yes</b>" in text and "simulated" in text and "offline" in text
    assert "score 90 | fits 24 GB" in text
    speed, load = history_frames([])
    assert len(speed) == 1 and list(load.columns) == ["time", "agent", "jobs", "cpu_percent"]


def test_counts_keep_online_ready_failed_and_offline_apart() -> None:
    snapshot = ClusterSnapshot(
        agents=[
            _agent("desk"), _agent("laptop", backend_reachable=False),
            _agent("ollama", model_state="failed", model_error="connection refused"),
            _agent("new", model_state="pulling"), _agent("pi", online=False, model_state=None),
        ],
        ready_models=["llama3.2:1b"], connected=True, generated_at=time.time(),
    )
    assert [cluster_status.agent_condition(agent) for agent in snapshot.agents] == [
        "ready", "unreachable", "failed", "starting", "offline"]
    assert cluster_status.counts_line(snapshot) == (
        "4 of 5 agents online · 1 ready · 1 starting · 1 failed · 1 unreachable · 1 offline")
    html = agents_table_html(snapshot)
    assert html.count("slb-dot slb-is-ready") == 1, "green only for the ready agent"
    nobody_ready = ClusterSnapshot(agents=[_agent("ollama", model_state="failed")], ready_models=[],
                                   connected=True, generated_at=time.time())
    assert cluster_status.counts_line(nobody_ready) == "1 of 1 agent online · 0 ready · 1 failed"


def test_offline_agent_row_is_greyed_with_since_when_and_no_jobs() -> None:
    now = time.time()
    snapshot = ClusterSnapshot(
        agents=[_agent("pi", online=False, model_state=None, last_seen_s=185.0, jobs_running=0, slots=4),
                _agent("desk", jobs_running=1, jobs_queued=2, slots=4, cpu_percent=31.0, ram_free_gb=22.46,
                       vram_free_gb=9.8, score=72.8, score_breakdown={"cpu": 17.5, "ram": 24.0, "gpu": 8.0,
                                                                      "speed": 23.3})],
        ready_models=["llama3.2:1b"], connected=True, generated_at=now,
    )
    html = agents_table_html(snapshot)
    offline_row = html[html.index('<tr class="slb-is-offline">'):]
    since = datetime.fromtimestamp(now - 185.0).strftime("%H:%M:%S")
    assert f"offline since {since} (3 min ago)" in offline_row
    assert ">–</div></td>" in offline_row and "running" not in offline_row and "ready" not in offline_row
    assert "1 of 4 running · 2 queued" in html and "CPU 31% · 22.5 GB RAM free · 9.8 GB VRAM free" in html
    assert "72.8<div" in html and "cpu 17.5/20 · ram 24/25 · gpu 8/25 · speed 23.3/30" in html
    frame = scores_frame(snapshot)
    assert frame[frame["agent"] == "desk"]["points"].sum() == pytest.approx(72.8)


def test_offline_view_clears_jobs_state_and_load_and_reasons_say_when_the_score_moved() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    record = AgentRecord(
        "pi", status=Status(state="offline"), model_state=ModelState(model="llama3.2:1b", state="ready"),
        telemetry=Telemetry(jobs_running=1, jobs_queued=3, cpu_percent=80.0, ram_free_gb=2.0),
        hardware=Hardware(cpu_physical_cores=4, cpu_max_ghz=2.4, ram_total_gb=8.0), alive_at=100.0)
    view = agent_view(record, catalog, reason="offline", cooling_down=False, now=160.0)
    assert (view.online, view.jobs_running, view.jobs_queued, view.model_state, view.cpu_percent) == (
        False, 0, 0, None, None)
    assert view.model == "llama3.2:1b" and view.last_seen_s == 60.0
    online = replace(record, status=Status(state="online"))
    live = agent_view(online, catalog, reason="score 40.0 → small", cooling_down=False, now=101.0, placed_score=40.0)
    assert (live.jobs_running, live.model_state) == (1, "ready")
    assert live.placement_reason == f"score 40.0 → small (score 40.0 when placed; {live.score:.1f} now)"
    same = agent_view(online, catalog, reason="r", cooling_down=False, now=101.0, placed_score=live.score)
    assert same.placement_reason == "r"


def test_a_reason_never_says_nothing_fits_about_a_model_that_failed() -> None:
    failed = "llama3.2:1b failed here 3 s ago (connection refused)"
    assert nothing_placed([failed]) == f"{failed}; no other catalog model to try"
    too_big = "llama3.2:3b needs 2 + 1 GB headroom, 1.5 GB RAM free"
    assert nothing_placed([too_big, failed]) == f"{failed}; no other catalog model fits: {too_big}"
    assert nothing_placed([too_big]) == f"no catalog model fits: {too_big}"


def test_sampler_draws_generation_only_while_answers_run_and_ends_offline_lines() -> None:
    agents = [_agent("desk", jobs_running=2, slots=4, tokens_per_s=30.0), _agent("idle", tokens_per_s=50.0),
              _agent("new", jobs_running=1, hardware={"benchmark": {"tokens_per_s": 12.0}}),
              _agent("pi", online=False, tokens_per_s=6.0, jobs_running=0)]
    snapshot = ClusterSnapshot(agents=agents, ready_models=[], connected=True, generated_at=time.time())
    sampler = ClusterSampler(lambda: snapshot, interval_s=1.0, window_s=60.0)
    sampler.sample()
    drawn = {sample.agent_id: sample.tokens_per_s for sample in sampler.history()}
    assert drawn == {"desk": 60.0, "idle": 0.0, "new": 12.0}, "idle is 0, offline is not drawn"
    assert generating_tokens_per_s(_agent("busy", jobs_running=9, slots=2, tokens_per_s=10.0)) == 20.0
    speed, _ = history_frames(sampler.history())
    assert set(speed["agent"]) == {"desk", "idle", "new"}
    assert agent_colors(["b", "a"]) == {"a": PLOT_COLORS[0], "b": PLOT_COLORS[1]}
    assert "&lt;x&gt;" in legend_html({"<x>": "#000"})


# ---------------------------------------------------------------------------- settings and requests


def test_settings_refuse_wildcard_cors_and_half_a_login() -> None:
    with pytest.raises(ValidationError, match="wildcard"):
        AppSettings(cors_origins=["*"])
    with pytest.raises(ValidationError, match="both"):
        AppSettings(ui_username="admin")
    settings = AppSettings(cors_origins="http://a.lan:3000, http://b.lan")  # type: ignore[arg-type]
    assert settings.cors_origins == ["http://a.lan:3000", "http://b.lan"]
    assert settings.loopback_only and not AppSettings(host="0.0.0.0").loopback_only


def test_openai_request_maps_options_and_checks_image_parts() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "max_tokens": 50, "temperature": 0.2, "stop": "END", "unknown_field": True}
    )
    assert request.options() == {"temperature": 0.2, "num_predict": 50, "stop": ["END"]}
    assert request.messages[0].text() == "hi"
    image = ChatCompletionRequest.model_validate(
        {"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    )
    assert image.messages[0].text() == ""  # the text of a message is its text parts; images are read apart
    with pytest.raises(BadRequest, match="url"):
        image.messages[0].images()


def test_ollama_options_are_checked() -> None:
    assert ollama_options({"temperature": 0.5, "num_ctx": 4096, "use_mmap": False}) == {
        "temperature": 0.5, "num_ctx": 4096, "use_mmap": False
    }
    with pytest.raises(BadRequest, match="options.mystery"):  # not an Ollama option: refused, never dropped
        ollama_options({"mystery": 1})
    with pytest.raises(BadRequest, match="temperature"):
        ollama_options({"temperature": "warm"})
    with pytest.raises(BadRequest, match="stop"):
        ollama_options({"stop": [1, 2]})


async def test_body_limits_cover_every_route_and_never_buffer() -> None:
    app = FastAPI()
    seen: list[int] = []

    @app.post("/{path:path}")
    async def echo(request: Request) -> dict[str, int]:
        size = 0
        async for piece in request.stream():
            size += len(piece)
            seen.append(size)
        return {"size": size}

    limits = BodyLimits(api=1000, gradio=5000, upload=20_000, other=100)
    assert [limits.for_path(path) for path in ("/v1/chat/completions", "/api/chat", "/gradio_api/queue/join",
                                               "/gradio_api/upload", "/login", "/")] == [1000, 1000, 5000, 20_000,
                                                                                         100, 100]
    wrapped = BodyLimitMiddleware(app, limits)

    async def chunks(count: int, size: int):
        for _ in range(count):
            yield b"x" * size

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://test") as client:
        assert (await client.post("/v1/echo", content=b"x" * 10)).json() == {"size": 10}
        refused = await client.post("/v1/echo", content=b"x" * 2000)
        assert refused.status_code == 413 and "limit" in refused.json()["error"]["message"]
        assert (await client.post("/api/chat", content=b"x" * 2000)).json() == {"error": refused.json()["error"][
            "message"]}
        assert (await client.post("/gradio_api/upload", content=b"x" * 15_000)).json() == {"size": 15_000}
        assert (await client.post("/gradio_api/call/x", content=b"x" * 15_000)).status_code == 413
        assert (await client.post("/login", content=b"x" * 200)).status_code == 413
        seen.clear()
        streamed = await client.post("/gradio_api/call/x", content=chunks(100, 1000))  # no Content-Length
        assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
        assert max(seen, default=0) <= 5000, "the app never saw more than the limit"


def test_route_labels_are_bounded() -> None:
    assert route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert route_label("/gradio_api/queue/join") == "/gradio_api"
    assert route_label("/api/whatever/123") == "/api/other"
    assert route_label("/assets/index-abc.js") == "/ui"


# ---------------------------------------------------------------------------- issue 12: runtimes, restarts, models


def test_a_restart_replaces_the_partial_text_with_a_visible_note() -> None:
    live = _FedLiveAnswer(mode="auto", simulated=set())
    live.apply(QueryStarted("r5", ["desk"], ["m"], "auto"))
    live.apply(TextDelta("r5", "Once upon a time", "desk", "m"))
    live.apply(AnswerRestarted("r5", "desk", "laptop", "m", "desk: agent desk went away <script>", 16))
    live.apply(TextDelta("r5", "A new", "laptop", "m"))
    streaming = live.messages()[0]["content"]
    assert "Once upon" not in streaming and "A new" in streaming
    assert "answer restarted on laptop: desk failed" in streaming
    assert "<script>" not in streaming and "&lt;script&gt;" in streaming, "the agent's reason is escaped"
    live.apply(QueryFinished("r5", "A new", ["desk", "laptop"], ["m", "m"], "auto", failovers=1))
    final = live.messages()[0]["content"]
    assert final.startswith("<p><em>answer restarted on laptop") and "Once upon" not in final
    assert live.record.text == "A new" and stats_of(live.record, set())["restarts"][0]["discarded_chars"] == 16


def test_token_counts_come_from_the_runtime_then_the_agent_then_the_app() -> None:
    record = AnswerRecord()
    record.apply(TextDelta("r6", "one", "desk", "m"))
    record.apply(TextDelta("r6", " two", "desk", "m"))
    record.apply(QueryFinished("r6", "one two", ["desk"], ["m"], "auto",
                               stats=ResultStats(prompt_tokens=4, output_tokens=9, finish_reason="length")))
    assert token_counts(record) == TokenCounts(4, 9, "runtime") and finish_reason(record) == "length"
    agent_counted = AnswerRecord()
    agent_counted.apply(QueryFinished("r7", "x y", ["desk"], ["m"], "auto",
                                      stats=ResultStats(output_tokens=2, tokens_counted_by="agent")))
    assert token_counts(agent_counted) == TokenCounts(0, 2, "agent") and finish_reason(agent_counted) == "stop"
    bare = AnswerRecord()
    bare.apply(QueryFinished("r8", "a fan-out answer of forty characters....", ["desk"], ["m"], "all"))
    assert token_counts(bare) == TokenCounts(0, 10, "app"), "estimated, never 0 for a non-empty answer"


@pytest.mark.parametrize(("value", "zero"), [
    (0, True), (0.0, True), ("0", True), ("0s", True), ("0m", True), (" 0h ", True), ("-0", True),
    (None, False), (False, False), (-1, False), ("5m", False), ("10", False), ("0.5s", False), ("", False),
])
def test_keep_alive_zero_is_recognised_in_every_spelling(value: object, zero: bool) -> None:
    assert keep_alive_is_zero(value) is zero


def test_pull_progress_is_one_bar_over_every_machine_and_success_only_at_the_end() -> None:
    progress = PullProgress("qwen2.5:7b")
    events = pull_events("qwen2.5:7b", ["a", "b"], fail={"b": "disk full"})
    lines = []
    for event in events:
        if isinstance(event, ManageStarted):
            lines.append(progress.started(event))
        elif isinstance(event, ManageProgress):
            line = progress.progress(event)
            if line is not None:
                lines.append(line)
        elif isinstance(event, ManageFinished):
            lines.append(progress.finished(event))
    assert lines[0]["status"] == "pulling manifest"
    assert [line.get("total") for line in lines if "total" in line][-1] == 2000
    assert not any(line.get("status") == "success" for line in lines)
    assert {"status": "pulled on a", "slb": {"agent": "a", "status": "success"}} in lines
    assert lines[-2]["status"] == "failed on b: disk full"
    assert lines[-1] == {"error": "pull qwen2.5:7b failed on b: disk full (it worked on a)"}


def test_agents_table_shows_the_runtime_profile_escaped() -> None:
    snapshot = ClusterSnapshot(
        agents=[
            _agent("laptop", backend="openai", slots=1, available_models={"smollm2": "loaded", "<i>x</i>": "local"},
                   runtime={"kind": "llama-cpp-python", "version": "0.3.36<b>", "slots": 1, "slots_source": "measured",
                            "continues_prefill": False, "interrupts_running": True,
                            "detected_by": 'GET /openapi.json"><script>'}),
            _agent("desk", backend="ollama", runtime={"kind": "ollama", "slots": 4, "continues_prefill": True}),
        ],
        ready_models=["llama3.2:1b"], connected=True, generated_at=time.time(),
    )
    html = agents_table_html(snapshot)
    assert "llama-cpp-python 0.3.36&lt;b&gt;" in html and "1 slot (measured)" in html
    assert "failover restarts" in html and "a new request interrupts" in html and "failover continues" in html
    assert "<script>" not in html and "<i>" not in html and "also: smollm2<" in html, "a refused name is left out"


def test_cluster_messages_name_each_runtime_and_escape_for_the_page() -> None:
    broker = AppSettings().broker
    snapshot = ClusterSnapshot(
        agents=[
            _agent("laptop", backend="openai", backend_url="http://10.0.0.5:1234/v1", backend_reachable=False,
                   backend_error="refused <b>", runtime={"kind": "lm-studio"}),
            _agent("mini", backend="ollama", backend_url="http://10.0.0.6:11434", backend_reachable=False),
        ],
        ready_models=[], connected=True, generated_at=time.time(),
    )
    message = cluster_status.cluster_message(snapshot, broker)
    assert "laptop cannot reach its LM Studio at http://10.0.0.5:1234/v1 (refused <b>)" in message
    assert "mini cannot reach Ollama at http://10.0.0.6:11434" in message
    assert message.count("Install Ollama") == 1, "only the Ollama agent is told to install Ollama"
    notice = cluster_status.notice_markdown(snapshot, broker)
    assert "<b>" not in notice and "refused \\<b\\>" in notice, "literal in Markdown: backslash-escaped"


def test_the_model_list_matches_runtime_spellings_and_lists_models_on_their_way() -> None:
    snapshot = ClusterSnapshot(
        agents=[_agent("pi", model="qwen2.5:7b", model_state="pulling"), _agent("desk", model="smollm2")],
        ready_models=[], connected=True, generated_at=time.time(),
    )
    available = [ModelAvailability("smollm2", [ModelHolder("desk", "/m/SmolLM2.gguf", "ready"),
                                               ModelHolder("pi", "smollm2:latest", "local")])]
    models = listed_models(snapshot, available)
    assert [model.name for model in models] == ["qwen2.5:7b", "smollm2"]
    assert models[0].coming_to == ["pi"] and models[0].agents == []
    assert find_listed("SmolLM2:latest", models) is models[1]
    assert find_listed("/other/path/smollm2.GGUF", models) is models[1]
    assert find_listed("mistral", models) is None
    assert mode_choices(models)[-2:] == [("model: qwen2.5:7b · on its way to pi", "qwen2.5:7b"),
                                         ("model: smollm2 · desk, pi", "smollm2")]


def test_agent_errors_and_model_names_are_escaped_wherever_they_are_shown() -> None:
    failed = answer_messages("", agents=["desk"], models=["m"], mode="auto", citations=[], simulated=set(),
                             stats={"error": "backend said <img src=x onerror=alert(1)>", "error_code": "failed",
                                    "answers": [{"agent_id": "pi", "model": "m", "text": "", "error": "<b>down</b>"}]})
    assert all("<img" not in message["content"] and "<b>down" not in message["content"] for message in failed)
    snapshot = ClusterSnapshot(agents=[_agent("desk", model="x`<img src=x onerror=alert(1)>`")], ready_models=[],
                               connected=True, generated_at=time.time())
    placement = placement_markdown(snapshot)
    assert "<img" not in placement and "<code>\\(a name no runtime uses\\)</code>" in placement


# ---------------------------------------------------------------------------- issue 13: rendering and limits


HOSTILE = ('<img src="http://evil.example/leak"> <form action="http://evil.example"><input type="password"></form>'
           '<div style="position:fixed;inset:0">X</div> ![pic](http://evil.example/pic.png) [docs](http://evil.example/a)')


def test_model_output_renders_as_markdown_without_html_or_images() -> None:
    rendered = markdown_html("**bold** and `x < y`\n\n```html\n<b>code</b>\n```\n\n" + HOSTILE)
    assert "<strong>bold</strong>" in rendered and "<code>x &lt; y</code>" in rendered
    assert "&lt;b&gt;code&lt;/b&gt;" in rendered, "code keeps its text"
    for tag in ("<img", "<form", "<input", "<div", 'style="'):
        assert tag not in rendered, tag
    assert "&lt;img src=" in rendered, "raw HTML shows as text"
    assert 'image: pic</a> <span class="slb-link-target">(http://evil.example/pic.png)</span>' in rendered
    assert '>docs</a> <span class="slb-link-target">(http://evil.example/a)</span>' in rendered
    assert "href=\"javascript" not in markdown_html("[x](javascript:alert(1))"), "shown as text, not a link"
    assert markdown_literal(HOSTILE).count("\\<") == HOSTILE.count("<") and "![" not in markdown_literal(HOSTILE)


def test_every_chat_message_is_rendered_here_with_the_allow_list() -> None:
    messages = answer_messages(HOSTILE, agents=["desk"], models=["![m](http://evil.example/m)"], mode="auto",
                               stats={"answers": [{"agent_id": "desk", "model": "m", "text": HOSTILE}]},
                               citations=[{"number": 1, "document_name": "<b>doc</b>", "snippet": HOSTILE}],
                               simulated=set())
    messages.append(user_message(HOSTILE))
    for message in messages:
        assert "<img" not in message["content"] and "<form" not in message["content"], message
        assert "position:fixed" not in message["content"].replace("&quot;", "") or "&lt;div" in message["content"]


def test_model_names_outside_the_runtimes_character_set_are_refused() -> None:
    for name in ("qwen2.5:7b", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "/models/SmolLM2.gguf",
                 "C:\\models\\my model.gguf", "lmstudio-community/Meta-Llama-3-8B-Instruct-GGUF"):
        assert valid_model_name(name), name
    for name in ("<img src=x>", "![m](http://x)", "a" * 201, "", "x\ny", 'x"y', None):
        assert not valid_model_name(name), name
    snapshot = ClusterSnapshot(agents=[_agent("desk", model="<img src=x>")], ready_models=["<img src=x>"],
                               connected=True, generated_at=time.time(), servable_models=["<img src=x>", "ok:1b"])
    assert cluster_status.servable(snapshot) == ["ok:1b"]
    available = [ModelAvailability("<b>x</b>", [ModelHolder("desk", "<b>x</b>", "local")]),
                 ModelAvailability("ok:1b", [ModelHolder("desk", "ok:1b", "local")])]
    assert [model.name for model in listed_models(snapshot, available)] == ["ok:1b"]


def test_status_is_bounded_and_redacted() -> None:
    agents = [_agent(f"a{n}", backend_url="http://me:pw@host:1/v1", backend_error="x" * 50_000,
                     local_models=[f"m{i}" for i in range(5000)],
                     hardware={"gpus": [{"name": "H100"}] * 5000, "nested": {"a": {"b": {"c": {"d": {"e": 1}}}}}})
              for n in range(300)]
    body = cluster_status.status(ClusterSnapshot(agents=agents, ready_models=[], connected=True,
                                                 generated_at=time.time()), AppSettings().broker, 0)
    assert len(body["agents"]) == cluster_status.STATUS_AGENTS and body["agents_omitted"] == 100
    entry = body["agents"][0]
    assert entry["backend_url"] == "http://me:***@host:1/v1"
    assert len(entry["backend_error"]) == cluster_status.STATUS_TEXT_CHARS
    assert len(entry["hardware"]["gpus"]) == cluster_status.STATUS_LIST_ITEMS + 1
    assert len(entry["local_models"]) == cluster_status.STATUS_LIST_ITEMS + 1
    assert len(json.dumps(body)) < 4 << 20


def test_failure_throttle_backs_off_exponentially_and_forgets() -> None:
    now = [0.0]
    throttle = FailureThrottle(free_failures=2, base_s=1.0, max_s=8.0, forget_s=100.0, max_keys=3,
                               clock=lambda: now[0])
    assert [throttle.failed("ip") for _ in range(6)] == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0]
    assert throttle.retry_after("ip", "user") == 8.0
    now[0] = 8.5
    assert throttle.retry_after("ip") == 0.0
    throttle.failed("ip")
    assert throttle.retry_after("ip") == 8.0, "capped at max_s"
    throttle.succeeded("ip")
    assert throttle.retry_after("ip") == 0.0 and throttle.failed("ip") == 0.0
    now[0] = 1000.0
    assert [throttle.failed("ip") for _ in range(3)] == [0.0, 0.0, 1.0], "forgotten after forget_s"
    for key in ("a", "b", "c", "d"):
        throttle.failed(key)
    assert len(throttle._keys) == 3, "made-up keys cannot grow memory"


async def test_status_is_built_once_per_period_off_the_event_loop() -> None:
    calls: list[str] = []

    def build() -> str:
        calls.append(threading.current_thread().name)
        time.sleep(0.05)
        return f"v{len(calls)}"

    cache = CachedBuild(build, max_age_s=0.3)
    results = await asyncio.gather(*(cache.get() for _ in range(20)))
    assert results == ["v1"] * 20 and len(calls) == 1 and calls[0] != threading.current_thread().name
    assert await cache.get() == "v1"
    await asyncio.sleep(0.35)
    assert await cache.get() == "v2"


class _FakeQueue:
    def __init__(self) -> None:
        self.pending_messages_per_session: dict[str, asyncio.Queue[int]] = {}
        self.pending_event_ids_session: dict[str, set[str]] = {}
        self.event_ids_to_events: dict[str, object] = {}


def test_unread_gradio_results_are_dropped_after_their_time_and_beyond_the_cap() -> None:
    now = [0.0]
    blocks = type("Blocks", (), {})()
    blocks._queue = queue = _FakeQueue()
    for index in range(5):
        messages: asyncio.Queue[int] = asyncio.Queue()
        messages.put_nowait(index)
        queue.pending_messages_per_session[f"s{index}"] = messages
        queue.pending_event_ids_session[f"s{index}"] = {f"e{index}"}
    queue.event_ids_to_events["e4"] = object()  # still running: never dropped
    queue.pending_messages_per_session["reader"] = asyncio.Queue()  # drained by its reader: never dropped
    sweeper = UnreadResults(blocks, ttl_s=10, max_unread=3, clock=lambda: now[0])
    assert sweeper.sweep() == 1 and "s0" not in queue.pending_messages_per_session, "the oldest beyond the cap"
    now[0] = 11
    assert sweeper.sweep() == 3
    assert set(queue.pending_messages_per_session) == {"s4", "reader"}
    assert set(queue.pending_event_ids_session) == {"s4"}


# ---------------------------------------------------------------------------- script API arity


def test_script_calls_may_leave_out_trailing_optional_arguments_but_not_required_ones() -> None:
    async def add(files_value: list[str] | None, name_value: str, private_value: bool = False,
                  request: gr.Request = None) -> dict:
        return {}

    with ScriptBlocks(analytics_enabled=False) as blocks:
        gr.api(add, api_name="add")
    function = next(iter(blocks.fns.values()))
    older_script = [None, "notes.txt"]
    blocks.validate_inputs(function, older_script)
    assert older_script == [None, "notes.txt", False]
    with pytest.raises(ValueError, match="enough input values"):
        blocks.validate_inputs(function, [None])

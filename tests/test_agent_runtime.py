"""The agent's view of its runtime: slot gate, slot and prefill probes, truncation, model operations.

The probes run against the Ollama double (which runs requests in parallel and continues a prefill, like Ollama)
and against a small OpenAI-compatible stand-in that behaves like llama-cpp-python on its defaults (interrupts a
running stream when another request arrives, ignores a trailing assistant message). The real llama-cpp-python
server is exercised end to end in tests/test_real_runtime.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.backends.base import ChatDelta, ChatDone, Truncated
from agent.backends.ollama_backend import OllamaBackend
from agent.backends.openai_backend import OpenAIBackend
from agent.jobs import SlotGate
from agent.operations import ModelOperations
from agent.runtime_profile import RuntimeKeeper, _max_overlap, _Stream, build_profile
from broker.protocol import ChatMessage, Manage, Operation
from tests.ollama_double import OllamaDouble

MODEL = "llama3.2:1b"


# ---------------------------------------------------------------- slot gate


async def test_slot_gate_bounds_running_jobs_and_can_shrink() -> None:
    gate = SlotGate(2)
    await gate.acquire()
    await gate.acquire()
    third = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    assert not third.done() and gate.busy == 2
    gate.set_capacity(1)
    gate.release()
    await asyncio.sleep(0.01)
    assert not third.done(), "capacity 1 with one job running leaves no room"
    gate.release()
    await asyncio.wait_for(third, 1)
    assert gate.busy == 1


async def test_slot_gate_exclusive_waits_for_running_and_holds_new_jobs() -> None:
    gate = SlotGate(4)
    await gate.acquire()
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def probe() -> None:
        async with gate.exclusive():
            entered.set()
            await leave.wait()

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.01)
    assert not entered.is_set(), "the probe must wait for the running job"
    gate.release()
    await asyncio.wait_for(entered.wait(), 1)
    job = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    assert not job.done(), "no job may start while the probe holds the runtime"
    leave.set()
    await asyncio.wait_for(task, 1)
    await asyncio.wait_for(job, 1)


def test_overlap_counts_streams_producing_at_once() -> None:
    serial = [_Stream(0.0, 1.0, "a", False), _Stream(1.2, 2.0, "b", False)]
    parallel = [_Stream(0.0, 1.0, "a", False), _Stream(0.1, 1.1, "b", False), _Stream(0.2, 0.9, "c", False)]
    assert _max_overlap(serial) == 1
    assert _max_overlap(parallel) == 3


# ---------------------------------------------------------------- a llama-cpp-python-like stand-in


class _InterruptingRuntime(ThreadingHTTPServer):
    """One slot; a new chat request ends the running stream with a bare ``[DONE]``; a trailing assistant message
    is ignored (a new turn starts). That is llama-cpp-python 0.3 on its defaults."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.generation = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: _InterruptingRuntime

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/openapi.json":
            self._send_json(200, {"info": {"title": "🦙 llama.cpp Python API", "version": "0.3.36"}})
        elif self.path == "/v1/models":
            with self.server.lock:
                self.server.generation += 1  # like the real server: listing models interrupts a running answer
            self._send_json(200, {"object": "list", "data": [{"id": "smollm2", "object": "model"}]})
        else:
            self._send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.generation += 1
            mine = self.server.generation
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
                 "mu", "nu", "xi"]
        limit = int(body.get("max_tokens") or len(words))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        finish = "length" if limit < len(words) else "stop"
        for index, word in enumerate(words[:limit]):  # a trailing assistant message is ignored: always from 0
            if self.server.generation != mine:
                self.wfile.write(b"data: [DONE]\n\n")  # interrupted: no finish reason
                return
            chunk = {"choices": [{"index": 0, "delta": {"content": (" " if index else "") + word},
                                  "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            threading.Event().wait(0.01)
        last = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture()
def interrupting() -> Iterator[_InterruptingRuntime]:
    server = _InterruptingRuntime()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def _collect(events: AsyncIterator[object]) -> tuple[str, list[object]]:
    text, rest = "", []
    async for event in events:
        if isinstance(event, ChatDelta):
            text += event.text
        else:
            rest.append(event)
    return text, rest


async def test_interrupted_stream_is_truncated_not_complete(interrupting: _InterruptingRuntime) -> None:
    backend = OpenAIBackend(interrupting.url)
    messages = [ChatMessage(role="user", content="go")]
    stream = asyncio.create_task(_collect(backend.chat("smollm2", messages, {"max_tokens": 14})))
    await asyncio.sleep(0.04)
    await backend.list_models()  # what the old health check did every 5 s
    with pytest.raises(Truncated, match="without a finish reason"):
        await stream
    text, done = await _collect(backend.chat("smollm2", messages, {"max_tokens": 3}))
    assert text == "alpha beta gamma"
    assert isinstance(done[-1], ChatDone) and done[-1].done_reason == "length"
    assert done[-1].output_tokens == 3 and done[-1].counted, "no usage sent: the agent counts pieces"
    await backend.close()


async def test_profile_of_an_interrupting_one_slot_runtime(interrupting: _InterruptingRuntime) -> None:
    backend = OpenAIBackend(interrupting.url)
    facts = await backend.detect()
    assert facts.kind == "llama-cpp-python" and facts.version == "0.3.36"
    assert backend.health_path == "/openapi.json"
    before = interrupting.generation
    assert (await backend.health()).reachable
    assert interrupting.generation == before, "the health check must not touch the model"
    profile = await build_profile(backend, "smollm2", limit=4, facts=facts)
    assert profile.kind == "llama-cpp-python" and profile.slots == 1 and profile.interrupts_running is True
    assert profile.continues_prefill is False, "it ignores a trailing assistant message"
    await backend.close()


async def test_profile_of_a_parallel_runtime_that_continues_prefill() -> None:
    with OllamaDouble(models=[MODEL], tokens_per_s=200) as double:
        double.config.reply_tokens = 40
        backend = OllamaBackend(double.url)
        profile = await build_profile(backend, MODEL, limit=3)
        assert profile.kind == "ollama" and profile.version
        assert profile.slots_source == "measured" and profile.interrupts_running is False
        assert profile.continues_prefill is True
        assert profile.slots == min(3, getattr(double.config, "num_parallel", 3) or 3)
        await backend.close()


async def test_keeper_starts_at_one_slot_until_measured() -> None:
    with OllamaDouble(models=[MODEL], tokens_per_s=200) as double:
        changes: list[int] = []
        keeper = RuntimeKeeper(OllamaBackend(double.url), limit=4, probe=True,
                               on_change=lambda profile: changes.append(profile.slots))
        assert keeper.slots == 1
        await keeper.detect()
        assert keeper.profile is not None and keeper.profile.slots_source == "default" and keeper.slots == 1
        assert keeper.can_pull
        undeclared = RuntimeKeeper(OllamaBackend(double.url), limit=3, probe=False, on_change=lambda _: None)
        await undeclared.detect()
        assert undeclared.slots == 3 and undeclared.profile is not None
        assert undeclared.profile.slots_source == "declared"
        await keeper.backend.close()
        await undeclared.backend.close()


# ---------------------------------------------------------------- model operations


async def test_manage_pull_reports_progress_then_success_and_errors_in_the_runtimes_words() -> None:
    with OllamaDouble(models=[MODEL], tokens_per_s=200) as double:
        double.config.pull_total_bytes = 4_000_000
        double.config.pull_bytes_per_s = 8_000_000
        backend = OllamaBackend(double.url)
        seen: list[Operation] = []
        refreshed = asyncio.Event()

        async def after_change() -> None:
            refreshed.set()

        operations = ModelOperations(backend, publish=seen.append, after_change=after_change)
        operations.submit(Manage(request_id="m1", action="pull", model="qwen2.5:0.5b"))
        operations.submit(Manage(request_id="m1", action="pull", model="qwen2.5:0.5b"))  # QoS 1 twice: once
        for _ in range(200):
            if any(op.done for op in seen):
                break
            await asyncio.sleep(0.02)
        done = [op for op in seen if op.done]
        assert len(done) == 1 and done[0].status == "success" and done[0].error is None
        assert refreshed.is_set()
        assert any(op.total_bytes for op in seen if not op.done), "progress carries byte counts"
        assert "qwen2.5:0.5b" in await backend.list_models()
        seen.clear()
        operations.submit(Manage(request_id="m2", action="pull", model="no-such-model:1b"))
        for _ in range(200):
            if any(op.done for op in seen):
                break
            await asyncio.sleep(0.02)
        failed = [op for op in seen if op.done]
        assert failed and failed[0].error and "file does not exist" in failed[0].error
        await operations.shutdown()
        await backend.close()


async def test_manage_on_a_runtime_that_cannot_pull_says_what_to_do(interrupting: _InterruptingRuntime) -> None:
    backend = OpenAIBackend(interrupting.url)
    await backend.detect()
    seen: list[Operation] = []

    async def nothing() -> None:
        return None

    operations = ModelOperations(backend, publish=seen.append, after_change=nothing)
    operations.submit(Manage(request_id="d1", action="delete", model="smollm2"))
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen and seen[-1].done and seen[-1].error and "cannot delete" in seen[-1].error
    await backend.close()


# ---------------------------------------------------------------- more than one model per machine


async def test_extra_models_are_pulled_beside_the_main_one_without_re_preparing_it() -> None:
    from agent.models import ModelManager
    from broker.protocol import Assign, ModelState

    with OllamaDouble(models=[MODEL], tokens_per_s=400) as double:
        double.config.pull_bytes_per_s = 50_000_000
        backend = OllamaBackend(double.url)
        states: list[ModelState] = []
        up = asyncio.Event()
        up.set()
        manager = ModelManager(backend, publish=states.append, wait_backend_up=up.wait,
                               report_unreachable=lambda error: None, benchmark_tokens=0)
        manager.handle_assign(Assign(model=MODEL, assignment_id="a1"))
        for _ in range(250):
            if manager.state.state == "ready":
                break
            await asyncio.sleep(0.02)
        assert manager.state.state == "ready"
        mark = len(states)
        manager.handle_assign(Assign(model=MODEL, assignment_id="a2", also=["qwen2.5:0.5b"]))
        for _ in range(250):
            if manager.has_local("qwen2.5:0.5b"):
                break
            await asyncio.sleep(0.02)
        assert manager.has_local("qwen2.5:0.5b"), "the extra model is pulled"
        after = states[mark:]
        assert after and all(state.state == "ready" for state in after), \
            f"the main model is not re-prepared: {[state.state for state in after]}"
        assert manager.state.assignment_id == "a2" and "qwen2.5:0.5b" in manager.state.local_models
        for task in manager.cancel_all():
            await asyncio.gather(task, return_exceptions=True)
        await backend.close()

"""Each backend against the test doubles: listing, pulling, streaming, continuing, and every failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from agent.backends import (
    BackendError,
    BackendUnreachable,
    ChatDelta,
    ChatDone,
    ContextTooLong,
    ModelNotFound,
    StreamBroken,
)
from agent.backends.ollama_backend import OllamaBackend
from agent.backends.openai_backend import OpenAIBackend
from agent.backends.simulated import SimulatedBackend, simulated_text
from broker.mqtt.local_broker import free_port
from broker.protocol import ChatMessage
from tests.ollama_double import OllamaDouble, reply_text

MODEL = "llama3.2:1b"


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def collect(stream: AsyncIterator[object]) -> tuple[str, ChatDone | None, list[str]]:
    pieces: list[str] = []
    done = None
    async for event in stream:
        if isinstance(event, ChatDelta):
            pieces.append(event.text)
        elif isinstance(event, ChatDone):
            done = event
    return "".join(pieces), done, pieces


@pytest.fixture()
def double() -> Iterator[OllamaDouble]:
    with OllamaDouble(models=[MODEL], tokens_per_s=0, pull_total_bytes=4_000_000, pull_bytes_per_s=20_000_000) as d:
        yield d


@pytest.fixture(params=["ollama", "openai"])
def backend(request: pytest.FixtureRequest, double: OllamaDouble) -> Iterator[OllamaBackend | OpenAIBackend]:
    if request.param == "ollama":
        yield OllamaBackend(double.url)
    else:
        yield OpenAIBackend(double.url + "/v1/")


async def test_health_and_models(backend: OllamaBackend | OpenAIBackend) -> None:
    assert (await backend.health()).reachable
    assert MODEL in await backend.list_models()
    await backend.warm(MODEL, "5m")
    await backend.close()


async def test_streams_echo_with_stats(backend: OllamaBackend | OpenAIBackend) -> None:
    text, done, pieces = await collect(backend.chat(MODEL, user("the sky is blue"), {"temperature": 0.1}))
    assert text == reply_text("the sky is blue") and pieces[0] == "Echo:" and len(pieces) == 5
    assert done is not None and done.output_tokens == 5 and done.prompt_tokens == 4
    assert done.done_reason == "stop"
    await backend.close()


async def test_num_predict_limits_output(backend: OllamaBackend | OpenAIBackend) -> None:
    text, done, _ = await collect(backend.chat(MODEL, user("a b c d e f"), {"num_predict": 3}))
    assert text == "Echo: a b" and done is not None and done.done_reason == "length"
    await backend.close()


async def test_assistant_prefix_is_continued(backend: OllamaBackend | OpenAIBackend, double: OllamaDouble) -> None:
    text, _, _ = await collect(backend.chat(MODEL, user("one two three four"), None, "Echo: one two"))
    assert text == " three four"
    path = "/api/chat" if isinstance(backend, OllamaBackend) else "/v1/chat/completions"
    sent = double.requests_to(path)[-1]["messages"]
    assert sent[-1] == {"role": "assistant", "content": "Echo: one two"}
    await backend.close()


async def test_missing_model(backend: OllamaBackend | OpenAIBackend) -> None:
    with pytest.raises(ModelNotFound, match="nope"):
        await collect(backend.chat("nope:1b", user("x")))
    await backend.close()


async def test_context_too_long(backend: OllamaBackend | OpenAIBackend, double: OllamaDouble) -> None:
    double.config.context_limit = 3
    with pytest.raises(ContextTooLong):
        await collect(backend.chat(MODEL, user("one two three four five")))
    await backend.close()


async def test_dies_mid_stream(backend: OllamaBackend | OpenAIBackend, double: OllamaDouble) -> None:
    double.config.die_after_tokens = 2
    received: list[str] = []
    with pytest.raises(StreamBroken, match="middle of an answer"):
        async for event in backend.chat(MODEL, user("a b c d e")):
            if isinstance(event, ChatDelta):
                received.append(event.text)
    assert received == ["Echo:", " a"]
    double.reset_faults()
    text, _, _ = await collect(backend.chat(MODEL, user("again")))
    assert text == "Echo: again"
    await backend.close()


async def test_server_error_keeps_its_message(backend: OllamaBackend | OpenAIBackend, double: OllamaDouble) -> None:
    double.config.fail_chat_status = 500
    with pytest.raises(BackendError, match="injected failure"):
        await collect(backend.chat(MODEL, user("x")))
    await backend.close()


async def test_unreachable_names_the_url(backend: OllamaBackend | OpenAIBackend, double: OllamaDouble) -> None:
    double.refuse_connections()
    health = await backend.health()
    assert not health.reachable and double.url in (health.error or "")
    with pytest.raises(BackendUnreachable, match=double.url):
        await backend.list_models()
    with pytest.raises(BackendUnreachable):
        await collect(backend.chat(MODEL, user("x")))
    double.accept_connections()
    assert (await backend.health()).reachable
    await backend.close()


async def test_closing_the_stream_closes_the_connection(backend: OllamaBackend | OpenAIBackend,
                                                         double: OllamaDouble) -> None:
    double.config.tokens_per_s = 50
    double.config.reply_tokens = 200
    stream = backend.chat(MODEL, user("long answer please"))
    async for event in stream:
        if isinstance(event, ChatDelta):
            break
    await stream.aclose()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 3
    while double.stats.streams_aborted_by_client < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert double.stats.streams_aborted_by_client == 1 and double.stats.active_streams == 0
    await backend.close()


async def test_ollama_pull_reports_bytes_and_adds_model(double: OllamaDouble) -> None:
    backend = OllamaBackend(double.url)
    steps = [step async for step in backend.pull("qwen2.5:0.5b")]
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    fractions = [step.fraction for step in steps if step.fraction is not None]
    assert fractions and fractions[-1] == 1.0 and len(fractions) >= 5
    assert steps[-1].total_bytes == 4_000_000 + 1024
    assert "qwen2.5:0.5b" in await backend.list_models()
    with pytest.raises(BackendError, match="file does not exist"):
        async for _ in backend.pull("no-such-model:7b"):
            pass
    await backend.close()


async def test_openai_cannot_pull_and_says_so(double: OllamaDouble) -> None:
    backend = OpenAIBackend(double.url)
    with pytest.raises(ModelNotFound, match="cannot pull models"):
        async for _ in backend.pull("qwen2.5:0.5b"):
            pass
    steps = [step async for step in backend.pull(MODEL)]
    assert steps and steps[0].status == "present"
    await backend.close()


async def test_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for backend in (OllamaBackend(url), OpenAIBackend(url)):
        assert not (await backend.health()).reachable
        with pytest.raises(BackendUnreachable):
            await backend.warm(MODEL)
        await backend.close()


async def test_simulated_backend_speed_and_text() -> None:
    backend = SimulatedBackend(tokens_per_s=200, ttft_s=0.05, pull_s=0.1)
    assert await backend.list_models() == []
    with pytest.raises(ModelNotFound):
        await collect(backend.chat(MODEL, user("hi")))
    steps = [step async for step in backend.pull(MODEL)]
    assert steps[-1].status == "success" and steps[-1].fraction == 1.0
    started = time.monotonic()
    text, done, pieces = await collect(backend.chat(MODEL, user("what is MQTT"), {"num_predict": 20}))
    elapsed = time.monotonic() - started
    assert text == "".join(simulated_text(MODEL, user("what is MQTT"), 20)) and len(pieces) == 20
    assert text.startswith("[simulated llama3.2:1b] You asked: what is MQTT")
    assert 0.05 + 19 / 200 * 0.9 <= elapsed < 1.0
    assert done is not None and done.output_tokens == 20 and done.generation_s
    rest, _, _ = await collect(backend.chat(MODEL, user("what is MQTT"), {"num_predict": 20}, text[:30]))
    assert text[:30] + rest == text

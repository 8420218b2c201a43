"""The Ollama double behaves like real Ollama where the tests lean on it: queued slots, /api/ps, keep_alive, delete.

Checked through the official ``ollama`` client and raw HTTP, because the agent and Open WebUI talk to real
Ollama that way; a double that is kinder than Ollama (unlimited parallel answers, an /api/ps that never
changes) would let the cluster pass tests it fails on a real machine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import ollama
import pytest

from tests.ollama_double import InvalidDuration, OllamaDouble, keep_alive_seconds, reply_text
from tests.support.processes import REPO, child_env, wait_until

MODEL = "llama3.2:1b"


@pytest.fixture()
def double() -> Iterator[OllamaDouble]:
    with OllamaDouble(models=[MODEL, "qwen2.5:0.5b"], tokens_per_s=200, reply_tokens=20) as running:
        yield running


def stream_chat(url: str, prompt: str, spans: dict[str, tuple[float, float]], texts: dict[str, str]) -> None:
    """Stream one /api/chat answer, noting when its first and last pieces came."""
    pieces: list[str] = []
    first = None
    for part in ollama.Client(host=url).chat(MODEL, [{"role": "user", "content": prompt}], stream=True):
        first = first or time.monotonic()
        pieces.append(part.message.content or "")
    spans[prompt] = (first or 0.0, time.monotonic())
    texts[prompt] = "".join(pieces)


def run_concurrently(url: str, prompts: list[str], gap_s: float = 0.03) -> tuple[dict, dict]:
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}
    threads = []
    for prompt in prompts:  # a small gap fixes the arrival order
        thread = threading.Thread(target=stream_chat, args=(url, prompt, spans, texts))
        thread.start()
        threads.append(thread)
        time.sleep(gap_s)
    for thread in threads:
        thread.join(20)
    return spans, texts


def test_one_slot_by_default_the_rest_wait_in_order_and_complete(double: OllamaDouble) -> None:
    prompts = [f"question {index}" for index in range(3)]
    _, texts = run_concurrently(double.url, prompts)
    assert texts == {prompt: reply_text(prompt, 20) for prompt in prompts}  # queued, never interrupted
    assert double.stats.peak_generations_running == 1 and double.stats.waited_for_slot == 2
    assert double.stats.slot_order == double.stats.arrived  # first come, first served


def test_num_parallel_runs_that_many_at_once(double: OllamaDouble) -> None:
    double.config.num_parallel = 2
    prompts = [f"question {index}" for index in range(4)]
    _, texts = run_concurrently(double.url, prompts, gap_s=0.01)
    assert texts == {prompt: reply_text(prompt, 20) for prompt in prompts}
    assert double.stats.peak_generations_running == 2


def test_raising_num_parallel_while_requests_wait_lets_them_start(double: OllamaDouble) -> None:
    double.config.reply_tokens = 200  # one second per answer
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}
    threads = [threading.Thread(target=stream_chat, args=(double.url, f"q{index}", spans, texts)) for index in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: double.stats.generations_running == 1 and double.stats.active_streams == 1, 5, "one running")
    time.sleep(0.1)
    assert httpx.post(f"{double.url}/_double/config", json={"num_parallel": 3}).json() == {"ok": True}
    wait_until(lambda: double.stats.generations_running == 3, 2, "all three running after the change")
    for thread in threads:
        thread.join(20)
    assert len(texts) == 3


def test_a_caller_that_hangs_up_while_queued_leaves_the_queue(double: OllamaDouble) -> None:
    double.config.reply_tokens = 100  # 0.5 s
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}
    running = threading.Thread(target=stream_chat, args=(double.url, "first", spans, texts))
    running.start()
    wait_until(lambda: double.stats.generations_running == 1, 5, "the first answer running")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "impatient"}]}).encode()
    with socket.create_connection((double.host, double.port)) as impatient:
        impatient.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.15)
    running.join(10)
    wait_until(lambda: double.stats.left_queue == 1, 3, "the hung-up caller to leave the queue")
    assert texts["first"] == reply_text("first", 100)
    assert double.stats.streams_started == 1  # the impatient one never got an answer started


def test_ps_lists_what_is_loaded_and_keep_alive_zero_unloads(double: OllamaDouble) -> None:
    client = ollama.Client(host=double.url)
    assert client.ps().models == []
    loaded = client.generate(MODEL, prompt="")  # Ollama's documented way to load
    assert loaded.done and loaded.done_reason == "load"
    assert [entry.model for entry in client.ps().models] == [MODEL]
    client.chat("qwen2.5:0.5b", [{"role": "user", "content": "hi"}])  # first use loads it too
    assert sorted(entry.model for entry in client.ps().models) == sorted([MODEL, "qwen2.5:0.5b"])
    unloaded = client.generate(MODEL, prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload" and unloaded.total_duration is None
    assert [entry.model for entry in client.ps().models] == ["qwen2.5:0.5b"]
    answer = client.chat(MODEL, [{"role": "user", "content": "once"}], keep_alive=0)
    assert answer.message.content == reply_text("once", 20)
    assert [entry.model for entry in client.ps().models] == ["qwen2.5:0.5b"]  # unloaded after that request
    assert double.stats.unloaded == [MODEL, MODEL]


def test_keep_alive_durations_and_expiry(double: OllamaDouble) -> None:
    client = ollama.Client(host=double.url)
    client.generate(MODEL, prompt="", keep_alive="300ms")
    assert [entry.model for entry in client.ps().models] == [MODEL]
    wait_until(lambda: not client.ps().models, 3, "the model to expire after keep_alive")
    client.generate(MODEL, prompt="", keep_alive=-1)
    assert client.ps().models[0].expires_at.year > 2100  # "forever", as Ollama writes it
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(MODEL, prompt="", keep_alive="soon")
    assert error.value.status_code == 400 and "invalid duration" in error.value.error
    assert keep_alive_seconds("1h30m", 300) == 5400 and keep_alive_seconds("0", 300) == 0
    assert keep_alive_seconds(None, 300) == 300 and keep_alive_seconds(-1, 300) is None
    with pytest.raises(InvalidDuration):
        keep_alive_seconds("10", 300)  # Go's ParseDuration wants a unit


def test_unload_during_an_answer_waits_for_it(double: OllamaDouble) -> None:
    double.config.reply_tokens = 100
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}
    running = threading.Thread(target=stream_chat, args=(double.url, "long", spans, texts))
    running.start()
    wait_until(lambda: double.stats.active_streams == 1, 5, "the answer running")
    client = ollama.Client(host=double.url)
    assert client.generate(MODEL, prompt="", keep_alive=0).done_reason == "unload"
    assert [entry.model for entry in client.ps().models] == [MODEL]  # still answering
    running.join(10)
    assert texts["long"] == reply_text("long", 100)
    assert client.ps().models == []


def test_delete_in_ollamas_shape(double: OllamaDouble) -> None:
    client = ollama.Client(host=double.url)
    assert client.delete("qwen2.5:0.5b").status == "success"
    assert [entry.model for entry in client.list().models] == [MODEL]
    with pytest.raises(ollama.ResponseError) as error:
        client.delete("qwen2.5:0.5b")
    assert error.value.status_code == 404 and error.value.error == "model 'qwen2.5:0.5b' not found"
    raw = httpx.request("DELETE", f"{double.url}/api/delete", json={"model": "nothing"})
    assert raw.status_code == 404 and raw.json() == {"error": "model 'nothing' not found"}
    ok = httpx.request("DELETE", f"{double.url}/api/delete", json={"model": MODEL})
    assert ok.status_code == 200 and ok.content == b""
    assert httpx.request("DELETE", f"{double.url}/api/delete").json() == {"error": "missing request body"}
    assert double.stats.deleted == ["qwen2.5:0.5b", MODEL]


def test_prefill_continuation_is_kept(double: OllamaDouble) -> None:
    full = reply_text("tell me more", 20)
    prefix = full[: full.index(" ", len(full) // 2)]
    messages = [{"role": "user", "content": "tell me more"}, {"role": "assistant", "content": prefix}]
    answer = ollama.Client(host=double.url).chat(MODEL, messages)
    assert prefix + answer.message.content == full


def test_malformed_stream_fault(double: OllamaDouble) -> None:
    double.config.malformed_after_tokens = 3
    with httpx.stream("POST", f"{double.url}/v1/chat/completions",
                      json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    unreadable = []
    for line in lines:
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            continue
        try:
            json.loads(data)
        except json.JSONDecodeError:
            unreadable.append(data)
    assert len(unreadable) == 1


def test_num_parallel_flag_of_the_process() -> None:
    process = subprocess.Popen([sys.executable, "-m", "tests.ollama_double", "--num-parallel", "3",
                                "--tokens-per-s", "0", "--ttft-ms", "0"],
                               cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().decode().split()[-1]
        prompts = [f"q{index}" for index in range(3)]
        _, texts = run_concurrently(url, prompts, gap_s=0.0)
        assert texts == {prompt: reply_text(prompt) for prompt in prompts}
        stats = httpx.get(f"{url}/_double/stats").json()
        assert stats["waited_for_slot"] == 0
    finally:
        process.terminate()
        process.wait(10)


def test_interrupted_stream_ends_cleanly_without_a_finish_reason(double: OllamaDouble) -> None:
    double.config.interrupt_after_tokens = 4
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x y z"}]}
    with httpx.stream("POST", f"{double.url}/v1/chat/completions", json=body) as reply:
        data = [line[len("data:"):].strip() for line in reply.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]] == [None] * 5
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == "Echo: x y z"


def test_load_time_is_paid_once_per_load(double: OllamaDouble) -> None:
    double.config.load_s = 0.5
    client = ollama.Client(host=double.url)
    started = time.monotonic()
    first = client.chat(MODEL, [{"role": "user", "content": "cold"}])
    cold_s = time.monotonic() - started
    started = time.monotonic()
    client.chat(MODEL, [{"role": "user", "content": "warm"}])
    warm_s = time.monotonic() - started
    assert 0.5 <= cold_s < 0.9 and warm_s < 0.4, (cold_s, warm_s)  # paid once, not twice, and not again
    assert first.load_duration is not None and first.load_duration >= 500_000_000


def test_prefill_costs_time_per_uncached_token_and_a_slot_keeps_its_last_prompt() -> None:
    """The next turn of a conversation on the same slot reads only its new part; another conversation evicts it."""
    history = " ".join(f"w{index}" for index in range(300))
    with OllamaDouble(models=[MODEL], tokens_per_s=0, prefill_tokens_per_s=1000, reply_tokens=5) as double:
        client = ollama.Client(host=double.url)

        def ask(messages: list[dict[str, str]]) -> tuple[float, str]:
            started = time.monotonic()
            reply = client.chat(MODEL, messages)
            return time.monotonic() - started, reply.message.content or ""

        first_turn = [{"role": "user", "content": history}]
        cold, answer = ask(first_turn)
        follow_up = [*first_turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "and?"}]
        warm, _ = ask(follow_up)
        assert cold >= 0.28 and warm < 0.15, (cold, warm)  # 301 tokens at 1,000/s vs ~10 new ones
        assert double.stats.prompt_tokens_cached >= 301
        ask([{"role": "user", "content": "another conversation " + history[:50]}])  # one slot: evicted
        read_before = double.stats.prompt_tokens_read
        evicted, _ = ask([*follow_up, {"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}])
        assert double.stats.prompt_tokens_read - read_before >= 300 and evicted >= 0.28


def test_reply_length_marker_sets_the_answer_length(double: OllamaDouble) -> None:
    reply = ollama.Client(host=double.url).chat(MODEL, [{"role": "user", "content": "tell me [[reply:7]] now"}])
    assert len((reply.message.content or "").split()) == 7

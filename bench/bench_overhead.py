"""Overhead of the whole path vs calling the backend directly: what the cluster adds to every answer.

Three ways to ask the same Ollama test double (fixed time to first token and
speed, ``tests/ollama_double.py`` as its own process), taking turns request by
request so machine load hits them alike:

* ``direct``: the bench streams ``POST /api/chat`` from the double itself;
* ``agent``: the bench publishes a Job over MQTT to a real agent process
  (``--backend ollama``) and reads its result chunks — MQTT + agent only;
* ``web``: ``POST /v1/chat/completions`` (SSE) on a real ``python -m app``
  → coordinator → MQTT → agent → double and back;
* ``floor``: the same request through ``bench/floor_proxy.py``, the least an
  HTTP → MQTT → agent hop can do in Python (no framework, routing or checks):
  what the architecture costs on this machine, before anything the app does.

Per request: TTFT (first text) and total time (end of stream). Figures are the
paired differences (``web − direct``) and ratios; ``agent − direct`` splits the
cost between the MQTT/agent hop and the web app + coordinator.

    python -m bench.bench_overhead [--full]
"""

from __future__ import annotations

import json
import queue
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import BenchResult, agent_args, bench_main, children, mosquitto, spread
from broker.mqtt.client import InboundMessage, MqttConnection
from broker.mqtt.local_broker import free_port
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage, Job, Result, Topics, decode, encode
from tests.support.loops import LoopThread, mqtt_connection
from tests.support.processes import ChildProcess, child_env, spawn, wait_until

NAME = "overhead"
MODELS = "llama3.1:8b,llama3.2:3b,llama3.2:1b"
AGENT_ID = "overhead-agent"
REPLY_TOKENS = 32
TOKENS_PER_S = 400.0
TTFT_MS = 20.0


@dataclass
class Timing:
    ttft_ms: float
    total_ms: float
    text: str


def _prompt(index: int) -> str:
    return f"question {index} about how the cluster routes answers between machines"


def ask_direct(client: httpx.Client, url: str, model: str, index: int) -> Timing:
    """Stream /api/chat from the double, as the agent's ollama client does."""
    body = {"model": model, "messages": [{"role": "user", "content": _prompt(index)}], "stream": True}
    text: list[str] = []
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/api/chat", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line:
                continue
            part = json.loads(line)
            content = (part.get("message") or {}).get("content")
            if content:
                if first is None:
                    first = time.perf_counter()
                text.append(content)
    ended = time.perf_counter()
    return Timing((first or ended) * 1000 - started * 1000, (ended - started) * 1000, "".join(text))


def ask_web(client: httpx.Client, url: str, index: int) -> Timing:
    """Stream /v1/chat/completions from the web app (mode auto)."""
    body = {"model": "auto", "messages": [{"role": "user", "content": _prompt(index)}], "stream": True}
    text: list[str] = []
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            part = json.loads(line[6:])
            if "error" in part:
                raise RuntimeError(f"web answer failed: {part['error']}")
            choices = part.get("choices") or []
            content = (choices[0].get("delta") or {}).get("content") if choices else None
            if content:
                if first is None:
                    first = time.perf_counter()
                text.append(content)
    ended = time.perf_counter()
    return Timing((first or ended) * 1000 - started * 1000, (ended - started) * 1000, "".join(text))


class AgentProbe:
    """Publishes jobs straight to the agent over MQTT and times its result chunks (no coordinator)."""

    def __init__(self, broker_url: str, prefix: str, agent_id: str) -> None:
        self.topics = Topics(prefix)
        self.agent_id = agent_id
        self.inbox: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
        self.connection = mqtt_connection(MqttSettings(broker_url=broker_url, topic_prefix=prefix),
                                          f"bench-probe-{uuid.uuid4().hex[:6]}", on_message=self.inbox.put,
                                          subscriptions=[(self.topics.result(agent_id), 1)])

    def start(self) -> None:
        self.connection.start()
        if not self.connection.wait_connected(10):
            raise RuntimeError("probe could not connect")

    def stop(self) -> None:
        self.connection.stop(timeout=0.5)

    def ask(self, model: str, index: int) -> Timing:
        request_id = f"probe{uuid.uuid4().hex[:12]}"
        job = Job(request_id=request_id, model=model, messages=[ChatMessage(role="user", content=_prompt(index))],
                  deadline=time.time() + 30)
        payload = encode(job)
        text: list[str] = []
        first = None
        started = time.perf_counter()
        self.connection.publish(self.topics.job(self.agent_id), payload, qos=1)
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            try:
                message = self.inbox.get(timeout=1)
            except queue.Empty:
                continue
            result = decode(Result, message.payload)
            if result.request_id != request_id:
                continue
            if result.delta:
                if first is None:
                    first = time.perf_counter()
                text.append(result.delta)
            if result.error:
                raise RuntimeError(f"agent answered with an error: {result.error}")
            if result.done:
                ended = time.perf_counter()
                return Timing((first or ended) * 1000 - started * 1000, (ended - started) * 1000, "".join(text))
        raise TimeoutError("the agent did not finish a probe job in 30 s")


def mqtt_echo(broker_url: str, count: int) -> dict[str, dict[str, float]]:
    """QoS 1 echo through a responder that answers in paho's network thread vs one that answers, as agent and
    coordinator do, on an asyncio loop (MqttConnection with ``loop=``): the difference is the thread hand-offs."""
    from bench import raw_mqtt
    from broker.mqtt.settings import parse_broker_url

    address = parse_broker_url(broker_url)
    replies: queue.SimpleQueue[float] = queue.SimpleQueue()
    asker = raw_mqtt.client("echo-asker")
    asker.on_message = lambda client, userdata, message: replies.put(time.perf_counter())
    asker.on_connect = lambda client, *args: client.subscribe("echo/pong/#", qos=1)
    asker.connect(address.host, address.port)
    asker.loop_start()
    raw = raw_mqtt.client("echo-raw")
    raw.on_connect = lambda client, *args: client.subscribe("echo/ping/raw", qos=1)
    raw.on_message = lambda client, userdata, message: client.publish("echo/pong/raw", message.payload, qos=1)
    raw.connect(address.host, address.port)
    raw.loop_start()
    background = LoopThread("echo-layer-loop")
    holder: list[MqttConnection] = []
    layer = MqttConnection(MqttSettings(broker_url=broker_url), f"echo-layer-{uuid.uuid4().hex[:6]}",
                           on_message=lambda message: holder[0].publish("echo/pong/layer", message.payload, qos=1),
                           subscriptions=[("echo/ping/layer", 1)], loop=background.loop)
    holder.append(layer)
    layer.start()
    layer.wait_connected(10)
    time.sleep(0.5)
    times: dict[str, list[float]] = {"raw": [], "layer": []}
    try:
        for index in range(count + 20):
            for kind in ("raw", "layer") if index % 2 else ("layer", "raw"):
                started = time.perf_counter()
                asker.publish(f"echo/ping/{kind}", b"x" * 200, qos=1)
                ended = replies.get(timeout=5)
                if index >= 20:
                    times[kind].append((ended - started) * 1000)
    finally:
        layer.stop(timeout=0.5)
        background.close(2)
        for client in (asker, raw):
            client.disconnect()
            client.loop_stop()
    return {kind: spread(values) for kind, values in times.items()}


def start_double(folder: Path) -> tuple[ChildProcess, str]:
    port = free_port()
    double = spawn("double", ["-m", "bench.double", "--port", str(port), "--models", MODELS,
                              "--tokens-per-s", str(TOKENS_PER_S), "--ttft-ms", str(TTFT_MS),
                              "--reply-tokens", str(REPLY_TOKENS)], folder)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/version", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 20, "the Ollama test double")
    return double, url


def start_app(folder: Path, broker_url: str, prefix: str) -> tuple[ChildProcess, str]:
    port = free_port()
    app = spawn("app", ["-m", "app", "--port", str(port), "--broker-url", broker_url, "--topic-prefix", prefix,
                        "--data-dir", str(folder / "app-data"), "--no-rag-warm-up", "--replan-debounce-s", "0.3",
                        "--log-level", "WARNING"], folder, env=child_env())
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not app.alive():
            raise RuntimeError(f"python -m app exited:\n{app.log()}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 120, "python -m app to answer /health", interval=0.25)
    return app, url


def start_floor(folder: Path, procs: list[ChildProcess], broker_url: str, prefix: str, model: str) -> str:
    """Start bench/floor_proxy.py for the agent's model; its URL once it accepts connections."""
    port = free_port()
    floor = spawn("floor", ["-m", "bench.floor_proxy", broker_url, prefix, AGENT_ID, model, str(port)], folder)
    procs.append(floor)

    def up() -> bool:
        if not floor.alive():
            raise RuntimeError(f"the floor proxy exited:\n{floor.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(up, 30, "the floor proxy", interval=0.1)
    return f"http://127.0.0.1:{port}"


def ready_model(url: str) -> str | None:
    try:
        agents = httpx.get(f"{url}/status", timeout=2).json().get("agents", [])
    except (httpx.HTTPError, ValueError):
        return None
    for agent in agents:
        if agent.get("id") == AGENT_ID and agent.get("online") and agent.get("model_state") == "ready":
            return agent.get("model")
    return None


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    rounds = 20 if quick else 300
    prefix = f"slbbench/{uuid.uuid4().hex[:6]}/v1"
    with tempfile.TemporaryDirectory(prefix="slb-bench-overhead-") as name, mosquitto() as broker, \
            children() as procs:
        folder = Path(name)
        double, double_url = start_double(folder)
        procs.append(double)
        started = time.perf_counter()
        app, app_url = start_app(folder, broker.url, prefix)
        procs.append(app)
        app_start_s = time.perf_counter() - started
        procs.append(spawn(AGENT_ID, agent_args(broker.url, prefix, AGENT_ID, folder, backend="ollama",
                                                extra=["--backend-url", double_url]), folder))
        model = wait_until(lambda: ready_model(app_url), 60, "the agent's model to be ready", interval=0.2)
        floor_url = start_floor(folder, procs, broker.url, prefix, model)
        probe = AgentProbe(broker.url, prefix, AGENT_ID)
        probe.start()
        timings: dict[str, list[Timing]] = {"direct": [], "agent": [], "web": [], "floor": []}
        try:
            with httpx.Client(timeout=30) as direct_client, httpx.Client(timeout=30) as web_client, \
                    httpx.Client(timeout=30) as floor_client:
                askers = {
                    "direct": lambda index: ask_direct(direct_client, double_url, model, index),
                    "agent": lambda index: probe.ask(model, index),
                    "web": lambda index: ask_web(web_client, app_url, index),
                    "floor": lambda index: ask_web(floor_client, floor_url, index),
                }
                for index in range(5):  # warm-up: connections, first-call imports, the coordinator's estimates
                    for ask in askers.values():
                        ask(index)
                order = list(askers)
                for index in range(rounds):
                    turn = index % len(order)
                    rotated = order[turn:] + order[:turn]
                    for key in rotated:
                        timings[key].append(askers[key](index))
        finally:
            probe.stop()
        echo = mqtt_echo(broker.url, 100 if quick else 1000)
        expected = timings["direct"][0].text
        mismatched = sum(1 for key in ("agent", "web", "floor") for timing in timings[key][:1]
                         if timing.text != expected)
    details: dict[str, object] = {
        "rounds": rounds, "reply_tokens": REPLY_TOKENS, "double_tokens_per_s": TOKENS_PER_S, "double_ttft_ms": TTFT_MS,
        "model": model, "app_start_s": round(app_start_s, 1), "text_mismatches": mismatched,
        "mqtt_echo_ms": echo,
    }
    for metric in ("ttft_ms", "total_ms"):
        for key in timings:
            details[f"{key}_{metric}"] = spread([getattr(t, metric) for t in timings[key]])
        for key in ("agent", "web", "floor"):
            added = [getattr(a, metric) - getattr(b, metric) for a, b in zip(timings[key], timings["direct"],
                                                                               strict=True)]
            ratio = [getattr(a, metric) / getattr(b, metric) for a, b in zip(timings[key], timings["direct"],
                                                                              strict=True)]
            details[f"{key}_added_{metric}"] = spread(added)
            details[f"{key}_ratio_{metric}"] = spread(ratio)
    result.details = details
    for metric, label in (("ttft_ms", "TTFT"), ("total_ms", "total")):
        added = details[f"web_added_{metric}"]
        ratio = details[f"web_ratio_{metric}"]
        result.add(f"{label} added by web→coordinator→MQTT→agent p50", added["p50"], "ms", "<=", 2.0)  # type: ignore[index]
        result.add(f"{label} added p95", added["p95"], "ms")  # type: ignore[index]
        result.add(f"{label} added p99", added["p99"], "ms", "<=", 5.0)  # type: ignore[index]
        result.add(f"{label} ratio web/direct p50", ratio["p50"], "×")  # type: ignore[index]
        result.add(f"{label} ratio p99", ratio["p99"], "×")  # type: ignore[index]
        result.add(f"{label} added by MQTT+agent only p50", details[f"agent_added_{metric}"]["p50"], "ms")  # type: ignore[index]
        result.add(f"{label} added by a minimal Python proxy (floor) p50", details[f"floor_added_{metric}"]["p50"],  # type: ignore[index]
                   "ms", note="bench/floor_proxy.py: the same hops, none of the app's work")
    result.add("direct total p50 (baseline)", details["direct_total_ms"]["p50"], "ms")  # type: ignore[index]
    result.add("MQTT echo, responder on asyncio loop (project) p50", echo["layer"]["p50"], "ms",
               note=f"in paho's thread (raw) {echo['raw']['p50']:.2f} ms")
    return result


def main() -> None:
    bench_main(NAME, run, __doc__)


if __name__ == "__main__":
    main()

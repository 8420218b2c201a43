"""Session fixtures for the app tests: a real ``python -m app`` with real agents on the session Mosquitto.

Loaded as a plugin (``pytest_plugins = ["tests.app_fixtures"]`` in the test
modules) so the cluster is started once and shared by the HTTP,
Gradio-client and browser tests. The LLM runtime is the Ollama test double
(``tests/ollama_double.py``); one more agent uses the simulated backend so
the "simulated" marking can be checked everywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.app_support import (
    API_KEY,
    ARTIFACTS,
    GPU_DESKTOP,
    OLLAMA_AGENT,
    RASPBERRY_PI,
    SIMULATED_AGENT,
    UI_USER,
    RunningApp,
    start_agent,
    start_app,
    wait_for_app,
)
from tests.ollama_double import OllamaDouble


@pytest.fixture(scope="session")
def app_cluster(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """The web app with an API key, one agent on the Ollama test double and one simulated agent, all ready."""
    folder = tmp_path_factory.mktemp("app-cluster")
    double = OllamaDouble(tokens_per_s=400, ttft_s=0.02, num_parallel=2).start()  # the agent's default 2 at once
    prefix = f"slbtest/app{uuid.uuid4().hex[:8]}/v1"
    running = start_app(folder, mosquitto, topic_prefix=prefix, extra=["--api-key", API_KEY])
    running.api_key = API_KEY
    running.double = double
    try:
        start_agent(running, folder, OLLAMA_AGENT, backend="ollama", backend_url=double.url,
                    profile=GPU_DESKTOP)
        start_agent(running, folder, SIMULATED_AGENT, backend="simulated", profile=RASPBERRY_PI,
                    extra=["--sim-tokens-per-s", "400", "--sim-ttft-ms", "20", "--sim-pull-s", "0.2"])

        def both_ready() -> bool:
            agents = {agent["id"]: agent for agent in running.status()["agents"]}
            return all(
                agents.get(name, {}).get("online") and agents[name].get("model_state") == "ready"
                for name in (OLLAMA_AGENT, SIMULATED_AGENT)
            )

        wait_for_app(both_ready, 60, "both agents online with a ready model", running)
        # The embedding model loads in the background (~100 MB): tests that measure the app's memory, and tests in
        # any order (the suite runs on several workers), start from an app that has finished warming up.
        wait_for_app(lambda: "document search ready" in running.app.log(None), 120, "document search warm", running)
        yield running
    finally:
        running.stop()
        double.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "app_cluster.log").write_text(running.logs())


@pytest.fixture(scope="session")
def bare_app(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """The web app with a UI login, a 50 KB upload limit and no agent at all (what a newcomer without Ollama sees)."""
    folder = tmp_path_factory.mktemp("bare-app")
    prefix = f"slbtest/bare{uuid.uuid4().hex[:8]}/v1"
    running = start_app(
        folder,
        mosquitto,
        topic_prefix=prefix,
        extra=["--ui-username", UI_USER[0], "--ui-password", UI_USER[1], "--no-rag-warm-up", "--max-upload-mb", "0.05"],
    )
    running.auth = UI_USER
    try:
        yield running
    finally:
        running.stop()

"""Document uploads embedded on the cluster's embedding agents, queries embedded locally (docs/rag.md
"Embedding uploads on the cluster").

Real parts: Mosquitto, the coordinator (in this process, on the test's event loop), ``python -m agent`` processes on
the Ollama double, LanceDB and the real MiniLM. The double's ``all-minilm`` answers with the real local MiniLM's
vectors, so a document embedded on the cluster must be found by a query embedded here — an honest check that the
two sides share one vector space. The double's default ``all-minilm`` (768 hash numbers) stands for a wrong model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from app.settings import AppSettings
from app.store.cluster_embedder import ON_CLUSTER, ON_THIS_MACHINE, ClusterEmbedder, ClusterRagStore
from app.store.embedding import Embedder
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.settings import MqttSettings
from tests.ollama_double import OllamaDouble
from tests.support.processes import REPO, AgentProcess, spawn
from tests.support.processes import wait_until_async as wait_until

pytestmark = pytest.mark.slow

CLUSTER_MODEL = "all-minilm"
PROFILE = REPO / "agent" / "profiles" / "laptop.json"
DOCUMENT = "\n\n".join(
    f"# {title}\n\n{body}" for title, body in [
        ("Dishwasher error E24", "The drain pump cannot empty the tub. Clean the filter at the bottom of the "
                                 "machine and check that the drain hose is not kinked behind the cabinet."),
        ("Washing machine balance", "When the drum shakes violently during the spin cycle, the load is uneven. "
                                    "Stop the cycle, spread the laundry evenly and level the feet."),
        ("Fridge temperature", "Keep the fridge between three and five degrees. A warm fridge usually has a "
                               "blocked air vent or a door seal that no longer closes tightly."),
    ])
QUESTION = "my laundry appliance jumps around when it spins"


@pytest.fixture(scope="module")
def local() -> Embedder:
    embedder = Embedder("all-MiniLM-L6-v2", threads=1)
    embedder.warm_up()
    return embedder


@pytest.fixture()
async def coordinator(mqtt_settings: MqttSettings) -> AsyncIterator[Coordinator]:
    running = Coordinator(CoordinatorSettings(
        broker_url=mqtt_settings.broker_url, topic_prefix=mqtt_settings.topic_prefix,
        data_dir=mqtt_settings.data_dir, replan_debounce_s=0.3, placement_mix=False))
    await running.start()
    assert await running.wait_connected(10)
    yield running
    await running.stop()


@pytest.fixture()
def agent_on(mqtt_settings: MqttSettings, tmp_path: Path) -> Iterator[Callable[[OllamaDouble], AgentProcess]]:
    started: list[tuple[AgentProcess, OllamaDouble]] = []

    def start(double: OllamaDouble) -> AgentProcess:
        double.__enter__()
        handle = spawn("embedder", [
            "-m", "agent", "--broker-url", mqtt_settings.broker_url, "--topic-prefix", mqtt_settings.topic_prefix,
            "--agent-id", "embedder", "--data-dir", str(tmp_path / "embedder"), "--backend", "ollama",
            "--backend-url", double.url, "--hardware-profile", str(PROFILE), "--telemetry-interval-s", "0.5",
            "--backend-check-interval-s", "1", "--benchmark-tokens", "2", "--log-level", "INFO",
        ], tmp_path, new_session=True, kind=AgentProcess)
        started.append((handle, double))
        return handle

    yield start
    for handle, double in started:
        handle.stop(timeout=5)
        double.__exit__(None, None, None)


async def serving_embeddings(coordinator: Coordinator, agent: AgentProcess) -> None:
    def offered() -> bool:
        view = next((view for view in coordinator.snapshot().agents if view.id == "embedder"), None)
        return view is not None and view.online and any(
            name.startswith(CLUSTER_MODEL) for name in view.available_models)

    await wait_until(offered, 60, f"the agent offering {CLUSTER_MODEL}", lambda: agent.log(3000))


async def upload(store: ClusterRagStore, text: str, name: str) -> tuple[Any, list[str]]:
    """``add_text`` from a worker thread, as the app calls it; returns the document and the progress lines."""
    lines: list[str] = []
    document = await asyncio.to_thread(store.add_text, text, name, progress=lambda _, line: lines.append(line))
    return document, lines


def embedding_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "embedded " in line]


async def test_uploads_embedded_on_the_cluster_are_found_by_local_queries(
        coordinator: Coordinator, agent_on: Callable[[OllamaDouble], AgentProcess], local: Embedder,
        tmp_path: Path) -> None:
    double = OllamaDouble(models=["llama3.2:1b", CLUSTER_MODEL],
                          embed_functions={CLUSTER_MODEL: lambda texts: local.encode(texts).tolist()})
    await serving_embeddings(coordinator, agent_on(double))
    embedder = ClusterEmbedder(coordinator, CLUSTER_MODEL, local, asyncio.get_running_loop())
    store = ClusterRagStore(tmp_path / "rag", embedder=embedder, batch_size=2)
    try:
        document, lines = await upload(store, DOCUMENT, "appliances.md")
        assert document.chunk_count == 3
        progress = embedding_lines(lines)
        assert progress and all(line.startswith(f"{ON_CLUSTER}: embedded ") for line in progress), lines
        assert embedder.cluster_batches == 2 and embedder.local_batches == 0  # 3 chunks in batches of 2
        sent = [text for _, path, body in double.stats.requests if path == "/api/embed" for text in body["input"]]
        assert len(sent) == 3 and any("spread the laundry evenly" in text for text in sent)

        hits = await asyncio.to_thread(store.search, QUESTION, 3, "vector")
        assert hits and hits[0].document_id == document.id and hits[0].section == "Washing machine balance"
        # The stored vector is the local model's own: the hit's cosine is what the local model gives the pair.
        stored_text = next(text for text in sent if "spread the laundry evenly" in text)
        expected = float(local.encode_query(QUESTION) @ local.encode([stored_text])[0])
        assert hits[0].relevance == pytest.approx(expected, abs=1e-4)
    finally:
        store.close()


async def test_a_cluster_model_with_other_vectors_is_refused_and_the_upload_embeds_here(
        coordinator: Coordinator, agent_on: Callable[[OllamaDouble], AgentProcess], local: Embedder,
        tmp_path: Path) -> None:
    """The double's own all-minilm gives 768 hash numbers: never mixed into the 384-dimensional index."""
    double = OllamaDouble(models=["llama3.2:1b", CLUSTER_MODEL])
    await serving_embeddings(coordinator, agent_on(double))
    embedder = ClusterEmbedder(coordinator, CLUSTER_MODEL, local, asyncio.get_running_loop())
    store = ClusterRagStore(tmp_path / "rag", embedder=embedder, batch_size=2)
    try:
        await asyncio.to_thread(store.warm_up)  # the app's start: the cluster's model is checked and refused
        assert embedder.disabled_reason is not None and "768-dimensional" in embedder.disabled_reason
        assert "384-dimensional" in embedder.disabled_reason
        document, lines = await upload(store, DOCUMENT, "appliances.md")
        progress = embedding_lines(lines)
        assert progress and all(
            line.startswith(f"{ON_THIS_MACHINE} (the cluster's model differs): ") for line in progress), lines
        assert embedder.cluster_batches == 0 and embedder.local_batches == 2
        asked = sum(1 for _, path, _ in double.stats.requests if path == "/api/embed")
        assert asked == 1  # the probe at start; switched off since, so no upload batch asked the cluster
        hits = await asyncio.to_thread(store.search, QUESTION, 3, "vector")
        assert hits and hits[0].document_id == document.id and hits[0].section == "Washing machine balance"
    finally:
        store.close()


@pytest.mark.parametrize("model", ["nomic-embed-text", "all-minilm:33m"])
def test_a_cluster_model_known_to_differ_is_refused_at_start(model: str) -> None:
    """all-minilm:33m is all-MiniLM-L12-v2: the same 384 dimensions, other vectors, so refused by name."""
    with pytest.raises(pydantic.ValidationError, match="not the document store's embedding model"):
        AppSettings(rag_cluster_embeddings=model)
    assert AppSettings(rag_cluster_embeddings="all-minilm:22m").rag_cluster_embeddings == "all-minilm:22m"
    assert AppSettings(rag_cluster_embeddings=" ").rag_cluster_embeddings is None


async def test_without_an_embedding_agent_the_app_embeds_uploads_here_and_says_so(
        mqtt_settings: MqttSettings, tmp_path: Path) -> None:
    """The app's own wiring (create_app → AppService → the store opened in a worker thread): no agent serves
    all-minilm, so every batch is embedded on this machine and the upload succeeds."""
    from app.server import create_app

    settings = AppSettings(
        broker_url=mqtt_settings.broker_url, topic_prefix=mqtt_settings.topic_prefix, data_dir=tmp_path / "app",
        rag_cluster_embeddings=CLUSTER_MODEL, rag_warm_up=False)
    coordinator = Coordinator(settings)
    await coordinator.start()
    app = create_app(settings, coordinator=coordinator)
    service = app.state.service
    try:
        assert await coordinator.wait_connected(10)
        lines: list[str] = []
        document = await service.documents.add_text(DOCUMENT, "appliances.md",
                                                     progress=lambda _, line: lines.append(line))
        store = await service._open_documents()
        assert isinstance(store, ClusterRagStore) and store.embedder.local_batches == 1  # 3 chunks, one batch of 16
        progress = embedding_lines(lines)
        assert progress and all(
            line.startswith(f"{ON_THIS_MACHINE} (no embedding agent available): ") for line in progress), lines
        hits = await service.documents.search(QUESTION, 3, "vector")
        assert hits and hits[0].document_id == document.id
    finally:
        await service.stop()
        await coordinator.stop()

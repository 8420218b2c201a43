"""Embeddings through the cluster (docs/api.md "Embeddings"): ``/v1/embeddings``, ``/api/embed`` and the legacy
``/api/embeddings`` come back exactly as the runtime answered them directly.

Real parts: Mosquitto, ``python -m app``, two ``python -m agent`` processes — one on llama-cpp-python's server
started with ``--embedding true`` (SmolLM2-135M, which does not pool: one vector per token), one on the Ollama
double, which serves ``nomic-embed-text`` with 768 numbers per vector in Ollama's own format. The ``openai`` and
``ollama`` SDKs are the clients. One app and one runtime for the module.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.app_support import RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble
from tests.support.llama_runtime import MODEL_ALIAS, LlamaServer, start_llama_server

pytestmark = pytest.mark.slow

BOX = {"description": "test box", "cpu_brand": "test CPU", "cpu_physical_cores": 2, "cpu_logical_cores": 2,
       "cpu_max_ghz": 3.0, "ram_total_gb": 16, "os": "Linux", "arch": "x86_64", "gpus": []}
EMBEDDER = "nomic-embed-text"


@dataclass
class Cluster:
    app: RunningApp
    runtime: LlamaServer
    double: OllamaDouble

    def agent(self, agent_id: str) -> dict[str, Any]:
        return next((agent for agent in self.app.status()["agents"] if agent["id"] == agent_id), {})


@pytest.fixture(scope="module")
def cluster(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder: Path = tmp_path_factory.mktemp("embeddings")
    runtime = start_llama_server(folder, name="llama-embed", extra_args=("--embedding", "true"))
    double = OllamaDouble(models=["llama3.2:1b", EMBEDDER]).start()
    app = start_app(folder, mosquitto, topic_prefix=f"slbtest/emb{uuid.uuid4().hex[:8]}/v1",
                    extra=["--no-rag-warm-up", "--embed-batch-inputs", "16"])
    try:
        start_agent(app, folder, "llama", backend="openai", backend_url=runtime.url, profile=BOX)
        start_agent(app, folder, "ollama", backend="ollama", backend_url=double.url, profile=BOX)
        running = Cluster(app, runtime, double)

        def ready() -> bool:
            llama, other = running.agent("llama"), running.agent("ollama")
            probed = (llama.get("runtime") or {}).get("interrupts_running") is not None
            return bool(probed and other.get("model_state") == "ready"
                        and MODEL_ALIAS in llama.get("available_models", {})
                        and EMBEDDER + ":latest" in other.get("available_models", {}))

        wait_for_app(ready, 90, "both agents serving", app)
        yield running
    finally:
        app.stop()
        double.stop()
        runtime.stop()


def direct_openai(runtime: LlamaServer, texts: list[str]) -> list[Any]:
    response = httpx.post(f"{runtime.url}/embeddings", json={"model": MODEL_ALIAS, "input": texts}, timeout=60)
    response.raise_for_status()
    return [item["embedding"] for item in sorted(response.json()["data"], key=lambda item: item["index"])]


def direct_ollama(double: OllamaDouble, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{double.url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def test_openai_sdk_gets_the_runtimes_own_vectors(cluster: Cluster) -> None:
    texts = ["hello world", "The cluster embeds text too."]
    client = openai.OpenAI(base_url=f"{cluster.app.url}/v1", api_key="unused", timeout=60)
    answer = client.embeddings.create(model=MODEL_ALIAS, input=texts, encoding_format="float")
    expected = direct_openai(cluster.runtime, texts)
    assert [item.embedding for item in answer.data] == expected
    assert [item.index for item in answer.data] == [0, 1]
    assert answer.model == MODEL_ALIAS and answer.usage.prompt_tokens > 0


def test_token_vectors_are_refused_where_ollamas_api_cannot_carry_them(cluster: Cluster) -> None:
    """SmolLM2 on llama-cpp-python does not pool: one vector per token, which /v1 passes on as the runtime gave
    it (above) but Ollama's one-list-per-input shape cannot hold — a clear 400, not a client-side crash."""
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=cluster.app.url, timeout=60).embed(model=MODEL_ALIAS, input="one more text")
    assert refused.value.status_code == 400 and "one vector per token" in refused.value.error
    assert isinstance(direct_openai(cluster.runtime, ["one more text"])[0][0], list)


def test_a_big_request_is_batched_and_comes_back_in_order(cluster: Cluster) -> None:
    """70 texts of 768 numbers: five embed jobs of at most 16 texts, each answer over several messages."""
    texts = [f"document number {index} about topic {index % 7}" for index in range(70)]
    before = sum(1 for method, path, _ in cluster.double.stats.requests if path == "/api/embed")
    answer = ollama.Client(host=cluster.app.url, timeout=60).embed(model=EMBEDDER, input=texts)
    expected = direct_ollama(cluster.double, "/api/embed", {"model": EMBEDDER, "input": texts})["embeddings"]
    assert [list(vector) for vector in answer.embeddings] == expected
    sent = [body for method, path, body in cluster.double.stats.requests if path == "/api/embed"][before:]
    assert sorted(len(body["input"]) for body in sent[:-1]) == [6, 16, 16, 16, 16]  # the last one was ours


def test_the_legacy_endpoint_gives_its_own_unnormalised_vector(cluster: Cluster) -> None:
    response = httpx.post(f"{cluster.app.url}/api/embeddings", json={"model": EMBEDDER, "prompt": "legacy"},
                          timeout=60)
    assert response.status_code == 200, response.text
    expected = direct_ollama(cluster.double, "/api/embeddings", {"model": EMBEDDER, "prompt": "legacy"})
    assert response.json() == expected
    normalised = direct_ollama(cluster.double, "/api/embed", {"model": EMBEDDER, "input": "legacy"})
    assert normalised["embeddings"][0] != expected["embedding"]


def test_base64_is_openais_float32_encoding(cluster: Cluster) -> None:
    """The ``openai`` SDK asks for base64 unless told otherwise and decodes it itself."""
    client = openai.OpenAI(base_url=f"{cluster.app.url}/v1", api_key="unused", timeout=60)
    answer = client.embeddings.create(model=EMBEDDER, input="packed")
    expected = direct_ollama(cluster.double, "/api/embed", {"model": EMBEDDER, "input": "packed"})["embeddings"][0]
    assert answer.data[0].embedding == pytest.approx(expected, rel=1e-6)
    raw = httpx.post(f"{cluster.app.url}/v1/embeddings", json={"model": EMBEDDER, "input": "packed",
                                                                "encoding_format": "base64"}, timeout=60).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(expected)}f", packed)) == [struct.unpack("<f", struct.pack("<f", value))[0]
                                                                 for value in expected]


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": 256}, 400, "dimensions"),
    ("/v1/embeddings", {"model": EMBEDDER, "input": [[1, 2, 3]]}, 400, "token ids"),
    ("/v1/embeddings", {"model": "all-minilm", "input": "x"}, 503, "all-minilm"),
    ("/v1/embeddings", {"model": "auto", "input": "x"}, 400, "routing mode"),
    ("/api/embed", {"model": EMBEDDER, "input": "x", "truncate": False}, 400, "truncate"),
    ("/api/embed", {"model": "all-minilm", "input": ["x"]}, 503, "all-minilm"),
    ("/api/embed", {"model": EMBEDDER, "input": []}, 400, "input is empty"),
])
def test_what_cannot_be_honoured_is_refused_by_name(cluster: Cluster, path: str, body: dict[str, Any], status: int,
                                                    needle: str) -> None:
    response = httpx.post(f"{cluster.app.url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert needle in message, message


def test_placement_keeps_the_embedding_model_beside_the_chat_model_where_it_fits() -> None:
    """``SLB_PLACEMENT_EMBEDDING_MODEL``: an extra (``also``) on every machine with room, never the main model."""
    from dataclasses import replace

    from broker.scheduling.placement import plan_placement
    from tests.test_placement import CATALOG, DEFAULTS, demo_cluster

    settings = replace(DEFAULTS, extra_models=0, embedding_model=EMBEDDER)
    plan = plan_placement(demo_cluster(), CATALOG, settings, now=1.0)
    assert plan.entries and all(entry.also == (EMBEDDER,) for entry in plan.entries), plan.entries
    assert all(entry.target_model != EMBEDDER for entry in plan.entries)
    without = plan_placement(demo_cluster(), CATALOG, replace(DEFAULTS, extra_models=0), now=1.0)
    assert all(entry.also == () for entry in without.entries)

"""Document ingestion embedded on the cluster's embedding agents, queries embedded here (docs/rag.md
"Embedding uploads on the cluster").

Why: a large upload is CPU-bound on the app's machine (about 10 chunks a second on 2 cores), while agents may
serve the same model (Ollama's ``all-minilm`` is all-MiniLM-L6-v2) on faster hardware. Queries stay local: one
short text embeds in ~15 ms here, less than a round trip through the broker.

The vectors contract: every vector in the index must come from the same model, or search silently ranks by
noise. So only a cluster model known to equal the local one is accepted at start (:func:`check_cluster_model`),
each agent's first batch is compared with the local model's vector of the same text (dimension and cosine), and
cluster vectors are normalised as the local embedder's are. A batch the cluster cannot embed (no agent, failure,
timeout, mismatch) is embedded locally instead: an upload never fails because the cluster is busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from app.store.embedding import Embedder
from app.store.rag import RagStore

if TYPE_CHECKING:
    from app.settings import AppSettings
    from broker.coordinator.embedding import EmbeddingAnswer

logger = logging.getLogger(__name__)

ON_CLUSTER = "embedding on the cluster"
ON_THIS_MACHINE = "embedding on this machine"
DEFAULT_BATCH_TIMEOUT_S = 60.0
"""Longest wait for one batch's vectors from the cluster before it is embedded here instead."""
SAME_MODEL_COSINE = 0.99
"""Least cosine between an agent's vector and the local one for the same text: the same weights in another
runtime (GGUF f16 in Ollama, float32 torch here) agree to ~0.999; a different model is far below."""

_MINILM_L6 = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})
_KNOWN_EQUAL = {
    local: frozenset({"all-minilm", "all-minilm:latest", "all-minilm:22m", "all-minilm:l6-v2"}) for local in _MINILM_L6
}
"""Local model → cluster names of the very same weights. Ollama's ``all-minilm:33m`` / ``l12-v2`` is
all-MiniLM-L12-v2: 384 dimensions too, but other vectors, so it is not here."""


class ClusterEmbeddingMismatch(ValueError):
    """The cluster's model does not produce the local model's vectors (another model, dimension or shape)."""


class EmbeddingCoordinator(Protocol):
    """What this module needs of the coordinator (broker/coordinator/runtime.py ``Coordinator.embed``)."""

    async def embed(self, model: str, inputs: list[str], timeout_s: float | None = None,
                    options: dict[str, Any] | None = None) -> EmbeddingAnswer: ...


def check_cluster_model(local_model: str, cluster_model: str) -> None:
    """Refuse (:class:`ClusterEmbeddingMismatch`) a cluster model that is known not to equal the local one.

    For the bundled all-MiniLM-L6-v2 only Ollama's names of the same weights pass. For another local model the
    name cannot be judged here; the first batch from each agent is compared with the local vectors instead.
    """
    local = local_model.strip().lower()
    cluster = cluster_model.strip().lower()
    allowed = _KNOWN_EQUAL.get(local)
    if allowed is not None and cluster not in allowed:
        raise ClusterEmbeddingMismatch(
            f"--rag-cluster-embeddings {cluster_model!r} is not the document store's embedding model "
            f"{local_model!r}: vectors of different models cannot share one index (search would rank by noise). "
            f"Use Ollama's all-minilm (the same all-MiniLM-L6-v2 weights), or leave the setting empty")


class ClusterEmbedder:
    """An :class:`~app.store.embedding.Embedder` stand-in: ``encode`` (ingestion, from a worker thread) asks the
    cluster and falls back to the local model per batch; everything else is the local embedder's."""

    def __init__(self, coordinator: EmbeddingCoordinator, cluster_model: str, local: Embedder,
                 loop: asyncio.AbstractEventLoop, *, batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_S) -> None:
        check_cluster_model(local.model_name, cluster_model)
        self.coordinator = coordinator
        self.cluster_model = cluster_model
        self.local = local
        self.loop = loop
        self.batch_timeout_s = batch_timeout_s
        self.cluster_batches = 0
        self.local_batches = 0
        self.disabled_reason: str | None = None
        self._verified_agents: set[str] = set()
        self._state_lock = threading.Lock()
        self._where = threading.local()

    # ---------------------------------------------------------------- the local embedder's part

    @property
    def model_name(self) -> str:
        return self.local.model_name

    @property
    def loaded(self) -> bool:
        return self.local.loaded

    @property
    def dimension(self) -> int:
        return self.local.dimension

    @property
    def max_tokens(self) -> int:
        return self.local.max_tokens

    def warm_up(self) -> None:
        """Load the local model, then check the cluster's model once if an agent serves it already (at app start
        agents are often not connected yet; every agent's first batch is checked anyway)."""
        self.local.warm_up()
        if self.disabled_reason is not None or _running_loop() is self.loop:
            return
        try:
            self._on_cluster(["all-MiniLM-L6-v2 probe: is the cluster's model the local one?"])
        except ClusterEmbeddingMismatch:
            pass  # logged as an error and switched off by _disable
        except Exception as error:  # noqa: BLE001 - no agent yet, or busy: the first upload checks again
            logger.info("cluster embeddings not checked at start: %s", _short_reason(error))

    def encode_query(self, text: str) -> np.ndarray:
        return self.local.encode_query(text)

    def forget_queries(self) -> None:
        self.local.forget_queries()

    def __getattr__(self, name: str) -> Any:
        """Anything else an :class:`Embedder` has (added later) is the local one's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.local, name)

    # ---------------------------------------------------------------- ingestion

    def last_place(self) -> str | None:
        """Where this thread's last batch was embedded: :data:`ON_CLUSTER` or :data:`ON_THIS_MACHINE` (with why)."""
        return getattr(self._where, "place", None)

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
        """Embed ``texts`` on the cluster, or here when the cluster cannot (the reason is logged and shown)."""
        if not texts:
            return self.local.encode(texts, batch_size=batch_size)
        reason = None if self.disabled_reason is None else "the cluster's model differs"
        if reason is None and _running_loop() is self.loop:
            reason = "called on the event loop"  # waiting there for the loop would never end
        if reason is None:
            try:
                vectors = self._on_cluster(list(texts))
            except Exception as error:  # noqa: BLE001 - any cluster failure means: embed this batch here
                reason = _short_reason(error)
                logger.info("embedding %d chunk(s) on this machine: the cluster could not (%s)", len(texts), reason)
            else:
                with self._state_lock:
                    self.cluster_batches += 1
                self._where.place = ON_CLUSTER
                return vectors
        with self._state_lock:
            self.local_batches += 1
        self._where.place = f"{ON_THIS_MACHINE} ({reason})"
        return self.local.encode(texts, batch_size=batch_size)

    def _on_cluster(self, texts: list[str]) -> np.ndarray:
        """One batch through ``Coordinator.embed`` on the app's event loop, checked against the contract."""
        running = asyncio.run_coroutine_threadsafe(
            self.coordinator.embed(self.cluster_model, texts, timeout_s=self.batch_timeout_s), self.loop)
        try:
            answer = running.result(self.batch_timeout_s + 5)
        except concurrent.futures.TimeoutError:
            running.cancel()
            raise TimeoutError(f"no vectors within {self.batch_timeout_s:.0f} s") from None
        vectors = self._checked(answer.vectors, len(texts))
        for agent_id in answer.agents:
            if agent_id not in self._verified_agents:
                self._verify(agent_id, texts[0], vectors[0])
        return vectors

    def _checked(self, raw: list[Any], count: int) -> np.ndarray:
        """The agents' vectors as unit-length float32 rows of the local dimension, or a mismatch (which also
        switches the cluster off for this process: a misconfigured model does not heal by retrying)."""
        dimension = self.local.dimension
        try:
            matrix = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            matrix = np.zeros((0,), dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != count:
            self._disable(f"the cluster's {self.cluster_model!r} does not give one vector per text (a runtime that "
                          f"does not pool gives one per token); the local {self.model_name!r} does")
        if matrix.shape[1] != dimension:
            self._disable(f"the cluster's {self.cluster_model!r} gives {matrix.shape[1]}-dimensional vectors, the "
                          f"local {self.model_name!r} {dimension}-dimensional ones")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if not np.all(np.isfinite(matrix)) or np.any(norms == 0):
            raise ValueError("the cluster answered zero or non-finite vectors")
        return np.ascontiguousarray(matrix / norms, dtype=np.float32)

    def _verify(self, agent_id: str, text: str, vector: np.ndarray) -> None:
        """The first batch from each agent: is its vector the local model's? One local embedding per agent."""
        local_vector = self.local.encode([text])[0]
        cosine = float(np.dot(local_vector, vector))
        if cosine < SAME_MODEL_COSINE:
            self._disable(f"agent {agent_id}'s {self.cluster_model!r} is not the local {self.model_name!r} "
                          f"(cosine {cosine:.3f} for the same text)")
        with self._state_lock:
            self._verified_agents.add(agent_id)
        logger.info("agent %s embeds with %s like the local %s (cosine %.4f)", agent_id, self.cluster_model,
                    self.model_name, cosine)

    def _disable(self, reason: str) -> None:
        with self._state_lock:
            if self.disabled_reason is None:
                self.disabled_reason = reason
                logger.error("cluster embeddings switched off for uploads, embedding them on this machine: %s; "
                             "use the same model on the cluster as here (docs/rag.md)", reason)
        raise ClusterEmbeddingMismatch(reason)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _short_reason(error: BaseException) -> str:
    """Why a batch was embedded here, in a few words for the progress line."""
    code = getattr(error, "code", None)
    if code == "no_agent":
        return "no embedding agent available"
    if code == "timeout" or isinstance(error, TimeoutError):
        return "the cluster took too long"
    if isinstance(error, ClusterEmbeddingMismatch):
        return "the cluster's model differs"
    return "the cluster failed"


def told_where(progress: Callable[[float, str], None] | None,
               embedder: ClusterEmbedder) -> Callable[[float, str], None] | None:
    """A progress callback whose embedding lines say where the last batch was embedded, e.g.
    ``embedding on the cluster: embedded 48/210 chunks, about 20 s left``."""
    if progress is None or getattr(progress, "_tells_where", False):
        return progress

    def report(fraction: float, message: str) -> None:
        place = embedder.last_place()
        if place is not None and message.startswith("embedded "):
            message = f"{place}: {message}"
        progress(fraction, message)

    report._tells_where = True  # type: ignore[attr-defined]
    return report


class ClusterRagStore(RagStore):
    """A :class:`RagStore` whose uploads embed through a :class:`ClusterEmbedder` and say where in their
    progress lines (the store itself is unchanged; only the progress callback is wrapped)."""

    embedder: ClusterEmbedder

    def add_file(self, *args: Any, progress: Callable[[float, str], None] | None = None, **kwargs: Any) -> Any:
        return super().add_file(*args, progress=told_where(progress, self.embedder), **kwargs)

    def add_bytes(self, *args: Any, progress: Callable[[float, str], None] | None = None, **kwargs: Any) -> Any:
        return super().add_bytes(*args, progress=told_where(progress, self.embedder), **kwargs)

    def add_text(self, *args: Any, progress: Callable[[float, str], None] | None = None, **kwargs: Any) -> Any:
        return super().add_text(*args, progress=told_where(progress, self.embedder), **kwargs)


def open_cluster_rag_store(settings: AppSettings, coordinator: Any, loop: asyncio.AbstractEventLoop,
                           **store_options: Any) -> ClusterRagStore:
    """The app's document store with ``--rag-cluster-embeddings`` set (app/server.py opens it)."""
    if getattr(coordinator, "embed", None) is None:
        raise ClusterEmbeddingMismatch("--rag-cluster-embeddings needs a coordinator that computes embeddings")
    model = settings.rag_cluster_embeddings or ""
    local = Embedder(settings.embedding_model, threads=1)
    embedder = ClusterEmbedder(coordinator, model, local, loop)
    logger.info("uploads embed on the cluster's %s agents (queries on this machine with %s)", model,
                settings.embedding_model)
    return ClusterRagStore(settings.data_dir, embedding_model=settings.embedding_model, embedder=embedder,
                           **store_options)  # type: ignore[arg-type]

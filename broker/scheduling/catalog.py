"""The model catalog: what each model needs (memory, weights, context), its size class (tier), and its other names.

The shipped ``broker/scheduling/catalog.json`` lists the common Ollama library
tags (llama3.x, qwen2.5, qwen3, gemma3, phi4, mistral, deepseek-r1, smollm2
and embedding models; tag ``tools`` marks function calling). ``--catalog FILE`` *extends or overrides* it (a user's
own models, or corrected figures); ``--catalog-path FILE`` *replaces* it. See
docs/scheduling.md.

Tiers are size classes with a score threshold: a machine scoring at least
``min_score`` qualifies for the tier (the default preference: ≥ 80 → 8B class,
60–80 → 3B class, below → 1B class). A model belongs to the tier it names, or
else to the smallest tier whose ``max_parameters_b`` holds it — so a catalog of
fifty models needs no hand-sorting, and a model larger than every tier is
served when a machine has it but never placed. Within a tier the first model
listed is the tier's default (its *primary*). Embedding models (tag
``embedding``) belong to no tier: they are never placed for chat.

Models the catalog does not know still get an estimate (:meth:`Catalog.estimate`)
from the size their name states (``135m``, ``8b``), so speed priors and fit
checks work for whatever a runtime reports.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.scheduling.names import model_key, parameters_from_name

DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog.json"
"""The catalog shipped with the project; ``--catalog-path`` names another, ``--catalog`` extends it."""

EMBEDDING_TAG = "embedding"
TOOLS_TAG = "tools"
"""The model calls functions (Ollama's ``tools`` capability): routing prefers it for a query with tools."""
REASONING_TAG = "reasoning"
ESTIMATED_TAG = "estimated"
VISION_TAG = "vision"
VISION_NAME_HINTS = ("llava", "vision", "moondream", "minicpm-v", "qwen2.5vl", "qwen2-vl", "qwen2.5-vl", "-vl",
                     "pixtral", "gemma3:4b", "gemma3:12b", "gemma3:27b", "llama4", "mistral-small3.1")
"""Names of models that take images, for models the catalog lacks (a catalog entry's ``vision`` tag decides)."""

WEIGHTS_GB_PER_BILLION = 0.6
"""Size of 4-bit weights (Ollama's default quantisation) per billion parameters, for models the catalog lacks."""
MEMORY_GB_PER_BILLION = 0.65
MEMORY_OVERHEAD_GB = 0.8
"""Context (KV cache) and runtime buffers on top of the weights, for models the catalog lacks."""
UNKNOWN_SIZE_B = 7.0
"""Assumed size of a model whose name states none (a common size; only priors and fit checks use it)."""
ESTIMATE_MEMO_SIZE = 4096


class CatalogError(ValueError):
    """The catalog file is missing or wrong; the message says where."""


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Tier name, referenced by models.")
    min_score: float = Field(ge=0, le=100, description="Lowest machine score (0–100) that qualifies for this tier.")
    description: str = ""
    max_parameters_b: float | None = Field(
        default=None, gt=0,
        description="Models naming no tier belong to the smallest tier whose bound holds their parameters.",
    )
    min_tokens_per_s: float | None = Field(
        default=None, ge=0,
        description="A machine expected (or measured) slower than this on a model of this tier is given a "
                    "smaller model.",
    )


class CatalogModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Model name as the backend knows it.")
    parameters_b: float = Field(gt=0, description="Parameter count in billions.")
    memory_gb: float = Field(gt=0, description="Memory needed to run it at the default quantisation (GB).")
    weights_gb: float | None = Field(
        default=None, gt=0, description="Bytes read per generated token (GB); default: memory_gb."
    )
    tier: str | None = Field(default=None, description="Tier this model serves; default: by parameters_b.")
    tags: list[str] = Field(default_factory=list)
    context_length: int | None = Field(default=None, gt=0, description="Longest context the model takes (tokens).")
    family: str | None = Field(default=None, max_length=100)
    aliases: list[str] = Field(
        default_factory=list, description="Other ids of this model, e.g. the tag Ollama calls 'latest'."
    )
    description: str = ""

    @property
    def read_gb(self) -> float:
        """What one token costs in memory traffic: speed ≈ bandwidth ÷ this."""
        return self.weights_gb or self.memory_gb

    @property
    def embedding(self) -> bool:
        return EMBEDDING_TAG in self.tags

    @property
    def estimated(self) -> bool:
        """True for a stand-in built from the name (:meth:`Catalog.estimate`), not a catalog entry."""
        return ESTIMATED_TAG in self.tags


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: list[Tier] = Field(min_length=1)
    models: list[CatalogModel] = Field(min_length=1)
    reference_model: str | None = Field(
        default=None, description="Model whose speed the score's speed part is measured against (default: largest)."
    )
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Catalog:
        tier_names = [tier.name for tier in self.tiers]
        if len(set(tier_names)) != len(tier_names):
            raise ValueError(f"tier names must be unique, got {tier_names}")
        if min(tier.min_score for tier in self.tiers) > 0:
            raise ValueError("the lowest tier must have min_score 0, so that every machine qualifies for one")
        model_names = [model.name for model in self.models]
        duplicates = sorted({name for name in model_names if model_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {duplicates}")
        keys: dict[str, str] = {}
        for model in self.models:
            for name in (model.name, *model.aliases):
                other = keys.setdefault(model_key(name), model.name)
                if other != model.name:
                    raise ValueError(f"{name!r} of model {model.name!r} already names model {other!r}")
        for model in self.models:
            if model.tier is not None and model.tier not in tier_names:
                raise ValueError(f"model {model.name!r} names tier {model.tier!r}, which is not in tiers {tier_names}")
            if model.tier is not None and model.embedding:
                raise ValueError(f"model {model.name!r} is an embedding model; it cannot serve tier {model.tier!r}")
        empty = [name for name in tier_names if not self._by_tier[name]]
        if empty:
            raise ValueError(f"tier(s) {empty} have no model")
        if self.reference_model is not None and self.reference_model not in model_names:
            raise ValueError(f"reference_model {self.reference_model!r} is not one of the models")
        return self

    # ---------------------------------------------------------------- lookups

    @cached_property
    def _by_key(self) -> dict[str, CatalogModel]:
        found: dict[str, CatalogModel] = {}
        for model in self.models:
            for name in (model.name, *model.aliases):
                found.setdefault(model_key(name), model)
        return found

    @cached_property
    def ordered_tiers(self) -> list[Tier]:
        """Tiers from the highest ``min_score`` down."""
        return sorted(self.tiers, key=lambda tier: tier.min_score, reverse=True)

    def model(self, name: str | None) -> CatalogModel | None:
        """The catalog entry for ``name`` in any spelling a runtime uses (``llama3.2`` is ``llama3.2:3b``)."""
        return self._by_key.get(model_key(name)) if name else None

    @cached_property
    def _tier_of(self) -> dict[str, str | None]:
        bounded = sorted((tier for tier in self.tiers if tier.max_parameters_b is not None),
                         key=lambda tier: tier.max_parameters_b or 0.0)
        found: dict[str, str | None] = {}
        for model in self.models:
            if model.tier is not None or model.embedding:
                found[model.name] = model.tier
                continue
            found[model.name] = next((tier.name for tier in bounded
                                      if model.parameters_b <= (tier.max_parameters_b or 0.0)), None)
        return found

    def tier_of(self, name: str | None) -> str | None:
        """The tier a model serves (named, or by its size), ``None`` for embeddings, unknown or too-large models."""
        model = self.model(name)
        return self._tier_of.get(model.name) if model is not None else None

    @cached_property
    def _by_tier(self) -> dict[str, tuple[CatalogModel, ...]]:
        return {tier.name: tuple(model for model in self.models if self._tier_of.get(model.name) == tier.name)
                for tier in self.tiers}

    @cached_property
    def _rank(self) -> dict[str, int]:
        return {tier.name: rank for rank, tier in enumerate(self.ordered_tiers)}

    @cached_property
    def _tiers_by_name(self) -> dict[str, Tier]:
        return {tier.name: tier for tier in self.tiers}

    def tier(self, name: str) -> Tier:
        return self._tiers_by_name[name]

    def models_of(self, tier: str) -> tuple[CatalogModel, ...]:
        """The models of ``tier`` in file order (the first is its primary)."""
        return self._by_tier[tier]

    def primary(self, tier: str) -> CatalogModel:
        """The model placement assigns for ``tier`` by default (the first one listed)."""
        return self.models_of(tier)[0]

    def tier_for_score(self, score: float) -> Tier:
        for tier in self.ordered_tiers:
            if score >= tier.min_score:
                return tier
        return self.ordered_tiers[-1]

    def tier_rank(self, tier: str) -> int:
        """0 for the highest tier, 1 for the next…"""
        return self._rank[tier]

    def tier_bounds(self, tier: str) -> tuple[float, float]:
        """Score range ``[low, high)`` of a tier (high is 100+ for the top tier)."""
        ordered = self.ordered_tiers
        rank = self.tier_rank(tier)
        high = ordered[rank - 1].min_score if rank > 0 else float("inf")
        return ordered[rank].min_score, high

    @cached_property
    def reference(self) -> CatalogModel:
        if self.reference_model:
            return self._by_key[model_key(self.reference_model)]
        return max(self.models, key=lambda model: model.parameters_b)

    @cached_property
    def derived(self) -> dict[object, object]:
        """Memo for values computed from this catalog (machine scores, estimates); it dies with the catalog."""
        return {}

    def estimate(self, name: str) -> CatalogModel:
        """The catalog entry for ``name``, else a stand-in sized from the name (``estimated`` tag).

        ``smollm2:135m`` → 0.135 B, 0.08 GB of weights; a name stating no size counts as 7 B. Only priors and
        fit checks use a stand-in; measured speeds replace it.
        """
        known = self.model(name)
        if known is not None:
            return known
        memo = self.derived
        key = ("estimate", model_key(name))
        found = memo.get(key)
        if found is None:
            if len(memo) >= ESTIMATE_MEMO_SIZE:
                memo.clear()
            stated = parameters_from_name(name)
            parameters = stated or UNKNOWN_SIZE_B
            tags = [ESTIMATED_TAG] + ([] if stated else ["size unknown"])
            if "embed" in model_key(name):
                tags.append(EMBEDDING_TAG)
            found = memo[key] = CatalogModel(  # the name is shown only; an agent's claim may be any length
                name=name[:200] or "unnamed", parameters_b=parameters,
                weights_gb=max(0.05, WEIGHTS_GB_PER_BILLION * parameters),
                memory_gb=round(MEMORY_GB_PER_BILLION * parameters + MEMORY_OVERHEAD_GB, 2), tags=tags)
        return found  # type: ignore[return-value]

    def supports_tools(self, name: str) -> bool | None:
        """Whether the model calls functions: True or False for catalog models, ``None`` for models it lacks."""
        known = self.model(name)
        return None if known is None else TOOLS_TAG in known.tags

    def has_vision(self, name: str) -> bool:
        """Whether the model takes images: its catalog entry's ``vision`` tag, else a vision name (llava, …)."""
        known = self.model(name)
        if known is not None:
            return VISION_TAG in known.tags
        key = model_key(name)
        return any(hint in key for hint in VISION_NAME_HINTS)

    def is_chat(self, name: str) -> bool:
        """False for embedding models (they never answer a chat)."""
        return not self.estimate(name).embedding

    def size_rank(self, name: str | None) -> float:
        """How big a model is, for ``quality`` routing: parameters when known or stated in the name, else 0."""
        if not name:
            return 0.0
        model = self.estimate(name)
        return 0.0 if "size unknown" in model.tags else model.parameters_b


# ---------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CatalogError(f"cannot read model catalog {path}: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CatalogError(f"model catalog {path} is not valid JSON: line {error.lineno} column {error.colno}: "
                           f"{error.msg}") from None


def extend_catalog(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` on top (raw JSON objects).

    A model of the overlay that names a base model (any spelling, aliases too) updates that entry field by field
    and keeps its place and name; a new model goes before the base models (a user's own model is preferred in its
    tier). A tier of the same name is updated field by field; new tiers are added. ``reference_model`` and
    ``description`` override.
    """
    merged = dict(base)
    for field in ("reference_model", "description"):
        if field in overlay:
            merged[field] = overlay[field]
    tiers = {tier.get("name"): tier for tier in base.get("tiers", []) if isinstance(tier, dict)}
    for tier in overlay.get("tiers", []):
        if isinstance(tier, dict):
            tiers[tier.get("name")] = {**tiers.get(tier.get("name"), {}), **tier}
    merged["tiers"] = list(tiers.values())
    models = [dict(model) for model in base.get("models", []) if isinstance(model, dict)]
    index = {}
    for position, model in enumerate(models):
        for name in (model.get("name"), *model.get("aliases", [])):
            if isinstance(name, str):
                index.setdefault(model_key(name), position)
    added = []
    for model in overlay.get("models", []):
        if not isinstance(model, dict):
            added.append(model)
            continue
        name = model.get("name")
        position = index.get(model_key(name)) if isinstance(name, str) else None
        if position is None:
            added.append(model)
        else:
            models[position] = {**models[position], **model, "name": models[position].get("name")}
    merged["models"] = added + models
    unknown = set(overlay) - {"tiers", "models", "reference_model", "description"}
    for field in unknown:  # let validation name the unknown field
        merged[field] = overlay[field]
    return merged


def load_catalog(path: Path | str, extra: Path | str | None = None) -> Catalog:
    """Read and validate a catalog (``extra``: a user catalog on top of it); :class:`CatalogError` says what is wrong.
    """
    path = Path(path)
    data = _read_json(path)
    where = str(path)
    if extra is not None:
        extra = Path(extra)
        overlay = _read_json(extra)
        if not isinstance(data, dict) or not isinstance(overlay, dict):
            raise CatalogError(f"model catalog {extra if isinstance(data, dict) else path} is invalid:\n"
                               "  <root>: a catalog is a JSON object with 'tiers' and 'models'")
        data = extend_catalog(data, overlay)
        where = f"{extra} (on top of {path})"
    try:
        return Catalog.model_validate(data)
    except ValidationError as error:
        problems = [
            f"  {'.'.join(str(part) for part in item['loc']) or '<root>'}: {item['msg']}"
            for item in error.errors(include_url=False)
        ]
        raise CatalogError(f"model catalog {where} is invalid:\n" + "\n".join(problems)) from None

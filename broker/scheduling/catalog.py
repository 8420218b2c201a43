"""The model catalog: which models the cluster may place, how much memory each needs, and its tier.

A JSON file the user edits (``broker/scheduling/catalog.json`` by default, ``--catalog-path``
to use another). Tiers map score ranges to models: a machine scoring at least
``min_score`` qualifies for that tier. Within a tier the first model listed is
the one placement assigns; the others are still valid named targets.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog.json"
"""The catalog shipped with the project; ``--catalog-path`` names another."""


class CatalogError(ValueError):
    """The catalog file is missing or wrong; the message says where."""


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Tier name, referenced by models.")
    min_score: float = Field(ge=0, le=100, description="Lowest machine score (0–100) that qualifies for this tier.")
    description: str = ""


class CatalogModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Model name as the backend knows it.")
    parameters_b: float = Field(gt=0, description="Parameter count in billions.")
    memory_gb: float = Field(gt=0, description="Memory needed to run it at the default quantisation (GB).")
    weights_gb: float | None = Field(
        default=None, gt=0, description="Bytes read per generated token (GB); default: memory_gb."
    )
    tier: str = Field(description="Name of the tier this model serves.")
    tags: list[str] = Field(default_factory=list)

    @property
    def read_gb(self) -> float:
        """What one token costs in memory traffic: speed ≈ bandwidth ÷ this."""
        return self.weights_gb or self.memory_gb


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tiers: list[Tier] = Field(min_length=1)
    models: list[CatalogModel] = Field(min_length=1)
    reference_model: str | None = Field(
        default=None, description="Model whose speed the score's speed part is measured against (default: largest)."
    )

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
        for model in self.models:
            if model.tier not in tier_names:
                raise ValueError(f"model {model.name!r} names tier {model.tier!r}, which is not in tiers {tier_names}")
        empty = [name for name in tier_names if not any(model.tier == name for model in self.models)]
        if empty:
            raise ValueError(f"tier(s) {empty} have no model")
        if self.reference_model is not None and self.reference_model not in model_names:
            raise ValueError(f"reference_model {self.reference_model!r} is not one of the models")
        return self

    # ---------------------------------------------------------------- lookups

    @cached_property
    def _by_name(self) -> dict[str, CatalogModel]:
        return {model.name: model for model in self.models}

    @cached_property
    def ordered_tiers(self) -> list[Tier]:
        """Tiers from the highest ``min_score`` down."""
        return sorted(self.tiers, key=lambda tier: tier.min_score, reverse=True)

    def model(self, name: str | None) -> CatalogModel | None:
        return self._by_name.get(name) if name else None

    @cached_property
    def _by_tier(self) -> dict[str, tuple[CatalogModel, ...]]:
        return {tier.name: tuple(model for model in self.models if model.tier == tier.name) for tier in self.tiers}

    @cached_property
    def _rank(self) -> dict[str, int]:
        return {tier.name: rank for rank, tier in enumerate(self.ordered_tiers)}

    def models_of(self, tier: str) -> tuple[CatalogModel, ...]:
        return self._by_tier[tier]

    def primary(self, tier: str) -> CatalogModel:
        """The model placement assigns for ``tier`` (the first one listed)."""
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
            return self._by_name[self.reference_model]
        return max(self.models, key=lambda model: model.parameters_b)

    @cached_property
    def derived(self) -> dict[object, object]:
        """Memo for values computed from this catalog (machine scores); it dies with the catalog."""
        return {}

    def size_rank(self, name: str | None) -> float:
        """How big a model is, for ``quality`` routing: parameters when known, else 0."""
        model = self.model(name)
        return model.parameters_b if model else 0.0


def load_catalog(path: Path | str) -> Catalog:
    """Read and validate a catalog; raise :class:`CatalogError` naming the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CatalogError(f"cannot read model catalog {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CatalogError(f"model catalog {path} is not valid JSON: line {error.lineno} column {error.colno}: "
                           f"{error.msg}") from None
    try:
        return Catalog.model_validate(data)
    except ValidationError as error:
        problems = [
            f"  {'.'.join(str(part) for part in item['loc']) or '<root>'}: {item['msg']}"
            for item in error.errors(include_url=False)
        ]
        raise CatalogError(f"model catalog {path} is invalid:\n" + "\n".join(problems)) from None

"""The shipped catalog, the user catalog on top of it, and model ids matched the way runtimes spell them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.scheduling.catalog import DEFAULT_CATALOG, CatalogError, load_catalog
from broker.scheduling.names import find_model, model_key, parameters_from_name, same_model

CATALOG = load_catalog(DEFAULT_CATALOG)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("left", "right", "same"),
    [
        ("llama3.2", "llama3.2:latest", True),  # Ollama: name == name:latest
        ("Llama3.2:LATEST", "llama3.2", True),
        ("llama3.2:1b", "llama3.2:3b", False),
        ("llama3.2:1b", "llama3.2", False),  # :latest is 3b on Ollama, but only the runtime knows its digests
        ("/models/SmolLM2-135M-Instruct-Q4_1.gguf", "smollm2-135m-instruct-q4_1", True),  # llama.cpp: GGUF path
        ("C:\\models\\smollm2.GGUF", "smollm2", True),
        ("smollm2", "smollm2:latest", True),
        ("registry.ollama.ai/library/qwen2.5:7b", "qwen2.5:7b", True),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen/qwen2.5-0.5b-instruct", True),  # vLLM / LM Studio ids
        ("", "x", False),
    ],
)
def test_one_rule_matches_model_ids(left: str, right: str, same: bool) -> None:
    assert same_model(left, right) is same
    assert same_model(right, left) is same


def test_find_model_returns_the_agents_own_spelling() -> None:
    assert find_model("smollm2:latest", ["qwen2.5:0.5b", "smollm2"]) == "smollm2"
    assert find_model("smollm2-135m-instruct-q4_1", ["/m/SmolLM2-135M-Instruct-Q4_1.gguf"]) == \
        "/m/SmolLM2-135M-Instruct-Q4_1.gguf"
    assert find_model("mistral", ["mistral:7b"]) is None
    assert model_key("Mistral:Latest") == "mistral"


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("smollm2:135m", 0.135), ("qwen2.5:0.5b", 0.5), ("llama3.1:8b", 8.0), ("qwen2.5:7b", 7.0),
        ("deepseek-r1:1.5b", 1.5), ("mixtral:8x7b", 56.0), ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", 1.0),
        ("SmolLM2-135M-Instruct", 0.135), ("llama3.1:8b-instruct-q4_K_M", 8.0), ("phi4-mini", None),
        ("llama3.2", None), ("nomic-embed-text:v1.5", None), ("bge-m3", None),
    ],
)
def test_sizes_are_read_from_names(name: str, billions: float | None) -> None:
    assert parameters_from_name(name) == billions


# ---------------------------------------------------------------- the shipped catalog


def test_the_shipped_catalog_has_the_common_ollama_families_with_figures() -> None:
    names = {model.name for model in CATALOG.models}
    for wanted in ("llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "llama3.3:70b", "qwen2.5:0.5b", "qwen2.5:32b",
                   "qwen3:0.6b", "qwen3:32b", "gemma3:1b", "gemma3:4b", "gemma3:12b", "gemma3:27b", "phi4-mini",
                   "phi4:14b", "mistral:7b", "mistral-nemo:12b", "deepseek-r1:1.5b", "deepseek-r1:32b",
                   "smollm2:135m", "smollm2:360m", "smollm2:1.7b", "nomic-embed-text", "all-minilm:22m"):
        assert wanted in names, wanted
    for model in CATALOG.models:
        assert model.context_length and model.weights_gb and model.family, model.name
        assert model.memory_gb >= model.weights_gb or "mixture-of-experts" in model.tags, model.name


def test_tiers_are_size_classes_with_the_original_defaults() -> None:
    assert [CATALOG.primary(tier.name).name for tier in CATALOG.ordered_tiers] == [
        "llama3.1:8b", "llama3.2:3b", "llama3.2:1b"]
    assert CATALOG.tier_of("qwen2.5:7b") == "large" and CATALOG.tier_of("phi4-mini") == "medium"
    assert CATALOG.tier_of("smollm2:135m") == "small"
    assert CATALOG.tier_of("qwen2.5:32b") is None  # larger than every tier: served where present, never placed
    for tier in CATALOG.ordered_tiers:
        assert not any(model.embedding for model in CATALOG.models_of(tier.name))
    assert CATALOG.tier_of("nomic-embed-text") is None


def test_aliases_and_estimates_for_what_the_catalog_does_not_list() -> None:
    assert CATALOG.model("llama3.2:latest").name == "llama3.2:3b"  # type: ignore[union-attr]
    assert CATALOG.model("phi4").name == "phi4:14b"  # type: ignore[union-attr]
    guess = CATALOG.estimate("/models/SmolLM2-135M-Instruct-Q4_1.gguf")
    assert guess.estimated and guess.parameters_b == 0.135 and guess.memory_gb < 1.0
    unknown = CATALOG.estimate("my-finetune")
    assert unknown.parameters_b == 7.0 and CATALOG.size_rank("my-finetune") == 0.0
    assert not CATALOG.is_chat("nomic-embed-text:latest") and not CATALOG.is_chat("some-embed-model")
    assert CATALOG.size_rank("qwen2.5:32b") > CATALOG.size_rank("llama3.1:8b") > CATALOG.size_rank("smollm2:1.7b")


# ---------------------------------------------------------------- a user catalog on top


def write(tmp_path: Path, data: object, name: str = "mine.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_user_catalog_extends_and_overrides_the_shipped_one(tmp_path: Path) -> None:
    user = write(tmp_path, {
        "tiers": [{"name": "xl", "min_score": 95, "max_parameters_b": 35, "min_tokens_per_s": 10}],
        "models": [
            {"name": "my-tuned:3b", "parameters_b": 3.0, "memory_gb": 3.1, "tier": "medium"},
            {"name": "llama3.1:latest", "memory_gb": 7.0},  # an alias: updates llama3.1:8b field by field
        ],
    })
    catalog = load_catalog(DEFAULT_CATALOG, user)
    assert catalog.primary("medium").name == "my-tuned:3b"  # a user's own model comes first in its tier
    assert catalog.model("llama3.1:8b").memory_gb == 7.0  # type: ignore[union-attr]
    assert catalog.model("llama3.1:8b").weights_gb == 4.9  # type: ignore[union-attr]
    assert catalog.tier_of("qwen2.5:32b") == "xl" and catalog.tier_of("qwen2.5:14b") == "xl"
    assert catalog.tier_for_score(96).name == "xl" and catalog.tier_for_score(90).name == "large"
    assert len(catalog.models) == len(CATALOG.models) + 1


def test_a_bad_user_catalog_names_both_files(tmp_path: Path) -> None:
    user = write(tmp_path, {"models": [{"name": "half-a-model", "parameters_b": 1}]})
    with pytest.raises(CatalogError) as error:
        load_catalog(DEFAULT_CATALOG, user)
    assert f"{user} (on top of {DEFAULT_CATALOG}) is invalid" in str(error.value)
    assert "models.0.memory_gb: Field required" in str(error.value)
    clash = write(tmp_path, {"models": [{"name": "x:1b", "parameters_b": 1, "memory_gb": 1, "aliases": ["mistral"]}]})
    with pytest.raises(CatalogError, match="'mistral' of model '(x:1b|mistral:7b)' already names model"):
        load_catalog(DEFAULT_CATALOG, clash)
    embedding_tier = write(tmp_path, {"models": [{"name": "nomic-embed-text", "tier": "small"}]})
    with pytest.raises(CatalogError, match="embedding model; it cannot serve tier 'small'"):
        load_catalog(DEFAULT_CATALOG, embedding_tier)


def test_an_old_style_catalog_still_loads(tmp_path: Path) -> None:
    """The catalog format before issue 12: three tiers, every model naming its tier."""
    old = write(tmp_path, {
        "tiers": [{"name": "large", "min_score": 80}, {"name": "medium", "min_score": 60},
                  {"name": "small", "min_score": 0}],
        "models": [{"name": "llama3.1:8b", "parameters_b": 8.0, "memory_gb": 6.2, "tier": "large"},
                   {"name": "llama3.2:3b", "parameters_b": 3.2, "memory_gb": 3.4, "tier": "medium"},
                   {"name": "llama3.2:1b", "parameters_b": 1.2, "memory_gb": 2.2, "tier": "small"}],
    })
    catalog = load_catalog(old)
    assert [catalog.primary(t.name).name for t in catalog.ordered_tiers] == ["llama3.1:8b", "llama3.2:3b",
                                                                             "llama3.2:1b"]
    assert catalog.reference.name == "llama3.1:8b"


def test_validate_config_shows_the_extended_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from broker.__main__ import main

    user = write(tmp_path, {"models": [{"name": "my-model:3b", "parameters_b": 3, "memory_gb": 3, "tier": "medium"}]})
    assert main(["--validate-config", "--catalog", str(user)]) == 0
    shown = capsys.readouterr().out
    assert f"extended by {user}" in shown and "medium (score ≥ 60): my-model:3b, llama3.2:3b" in shown
    assert "never placed (larger than every tier): llama3.3:70b" in shown and "nomic-embed-text" in shown
    broken = write(tmp_path, {"models": [{"name": "x"}]}, "broken.json")
    assert main(["--validate-config", "--catalog", str(broken)]) == 2
    assert "models.0.memory_gb: Field required" in capsys.readouterr().err

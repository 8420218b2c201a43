"""The agent's settings: every field is a ``--flag`` and an ``SLB_`` variable (see broker.mqtt.cli)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from broker.mqtt.settings import MqttSettings
from broker.protocol import is_valid_agent_id
from broker.protocol.messages import RuntimeKind

DEFAULT_BACKEND_URLS = {"ollama": "http://127.0.0.1:11434", "openai": "http://127.0.0.1:8080", "simulated": ""}
"""Where each backend listens by default (Ollama's own default; llama.cpp server's default port)."""


class AgentSettings(MqttSettings):
    """One agent: its identity, its inference backend, and how it reports and streams."""

    agent_id: str | None = Field(
        default=None,
        description="Stable id of this agent (also its MQTT username on a secured broker). "
        "Default: made once from the hostname and kept in DATA_DIR/agent_id.",
    )
    backend: Literal["ollama", "openai", "simulated"] = Field(
        default="ollama",
        description="Inference backend: ollama, openai (any OpenAI-compatible server: llama.cpp, vLLM, "
        "LM Studio) or simulated (demos and benchmarks only).",
    )
    backend_url: str | None = Field(
        default=None,
        description="Backend base URL. Default: $OLLAMA_HOST or http://127.0.0.1:11434 for ollama, "
        "http://127.0.0.1:8080 for openai.",
    )
    backend_api_key: SecretStr | None = Field(default=None, description="Bearer token for an OpenAI-compatible server.")
    hardware_profile: Path | None = Field(
        default=None,
        description="JSON file declaring the hardware instead of probing it (fields: cpu_brand, "
        "cpu_physical_cores, cpu_max_ghz, ram_total_gb, gpus [{name, vendor, vram_total_gb}]; all optional).",
    )
    sim_tokens_per_s: float = Field(default=20.0, gt=0, description="Simulated backend: tokens per second per job.")
    sim_ttft_ms: float = Field(default=300.0, ge=0, description="Simulated backend: time to first token, ms.")
    sim_pull_s: float = Field(default=2.0, ge=0, description="Simulated backend: seconds a model pull takes.")
    max_parallel: int | None = Field(
        default=None,
        ge=1,
        description="Most jobs run at once; the runtime's measured slots may be fewer. "
        "Default: $OLLAMA_NUM_PARALLEL or 2 for ollama, 4 for openai and simulated.",
    )
    probe_runtime: bool = Field(
        default=True,
        description="Measure the runtime's real parallel slots and prefill continuation at warm-up "
        "(off: trust --max-parallel and never continue a partial answer).",
    )
    runtime_kind: RuntimeKind | None = Field(
        default=None,
        description="Skip detection: ollama, llama.cpp, llama-cpp-python, lm-studio, vllm or openai "
        "(decides the health check; see docs/runtimes.md).",
    )
    max_queue: int = Field(default=16, ge=0, description="Jobs waiting beyond max_parallel; more are refused (busy).")
    telemetry_interval_s: float = Field(default=2.0, gt=0, description="Seconds between telemetry messages.")
    chunk_interval_ms: float = Field(
        default=30.0, ge=0, description="After the first chunk, at most one result message per this many ms."
    )
    chunk_max_tokens: int = Field(default=16, ge=1, description="...or per this many tokens, whichever comes first.")
    stall_timeout_s: float = Field(
        default=120.0, gt=0, description="End a job when the backend sends nothing for this long (model load included)."
    )
    keep_alive: str = Field(default="30m", description="How long Ollama keeps the served model loaded after a job.")
    benchmark_tokens: int = Field(
        default=32, ge=0, description="Tokens of the warm-up generation that measures speed (0: from jobs only)."
    )
    backend_check_interval_s: float = Field(default=5.0, gt=0, description="Seconds between backend health checks.")
    backend_retry_max_s: float = Field(
        default=10.0, gt=0, description="Longest wait between reconnection attempts while the backend is down."
    )
    serve_local_models: bool = Field(
        default=True, description="Also run jobs for models present on the backend but not assigned."
    )
    stats_window_s: float = Field(default=120.0, gt=0, description="Window of the tokens/s and TTFT in telemetry.")
    remembered_jobs: int = Field(default=4096, ge=16, description="Request ids remembered to run each job once.")

    @field_validator("agent_id")
    @classmethod
    def _check_agent_id(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_agent_id(value):
            raise ValueError("agent id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
        return value

    @property
    def resolved_backend_url(self) -> str:
        """The URL the backend is reached at (explicit, $OLLAMA_HOST, or the default)."""
        if self.backend_url:
            return self.backend_url.rstrip("/")
        if self.backend == "ollama" and os.environ.get("OLLAMA_HOST"):
            host = os.environ["OLLAMA_HOST"]
            return (host if "://" in host else f"http://{host}").rstrip("/")
        return DEFAULT_BACKEND_URLS[self.backend]

    @property
    def resolved_max_parallel(self) -> int:
        """Parallel jobs: explicit, else what the backend runs in parallel by default."""
        if self.max_parallel:
            return self.max_parallel
        if self.backend == "ollama":
            try:
                return max(1, int(os.environ.get("OLLAMA_NUM_PARALLEL", "")))
            except ValueError:
                return 2
        return 4

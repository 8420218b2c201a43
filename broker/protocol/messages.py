"""One frozen pydantic model per topic (see docs/protocol.md).

Every message carries ``v`` (protocol version) and ``ts`` (sender's Unix time).
Unknown fields are ignored so that newer senders stay readable by older readers.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from broker.protocol.redaction import redact_url, redact_urls_in

PROTOCOL_VERSION = 1

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_ID_RE = re.compile(_ID_PATTERN)

# Agent ids double as MQTT usernames and topic levels, so MQTT wildcards
# (``+``, ``#``) and level separators (``/``) can never appear in them.
AgentId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
RequestId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]

MAX_PROMPT_CHARS = 400_000
"""Upper bound for the text of one job; larger jobs are refused at the edge."""

# What an agent may claim (issue 13.6, docs/protocol.md "Limits"). Lists and names over their limit make the
# message invalid (dropped whole); measured numbers are capped, so a measurement spike never silences an honest
# agent and a liar gains at most the ceiling; error texts are cut.
MAX_NAME_CHARS = 200
MAX_HOSTNAME_CHARS = 255
MAX_URL_CHARS = 2048
MAX_ERROR_CHARS = 2000
MAX_GPUS = 16
MAX_MODELS = 2000
MAX_PARALLEL = 64
MAX_TOKENS_PER_S = 10_000.0
MAX_SECONDS = 86_400.0


def _at_most(limit: float) -> AfterValidator:
    """Cap a number that passed its other checks (``ge=0``) at ``limit``."""
    return AfterValidator(lambda value: value if value <= limit else type(value)(limit))


def _cut(text: object) -> object:
    """Error texts longer than :data:`MAX_ERROR_CHARS` are cut (an honest backend may say a lot), URLs redacted."""
    if not isinstance(text, str):
        return text
    text = redact_urls_in(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _redacted_url(url: object) -> object:
    return redact_url(url) if isinstance(url, str) else url


Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
"""Model, GPU, CPU, OS, version and runtime names."""
Hostname = Annotated[str, StringConstraints(max_length=MAX_HOSTNAME_CHARS)]
ErrorText = Annotated[str, BeforeValidator(_cut)]
BackendUrl = Annotated[str, StringConstraints(max_length=MAX_URL_CHARS), AfterValidator(_redacted_url)]
TokensPerSecond = Annotated[float, Field(ge=0), _at_most(MAX_TOKENS_PER_S)]
Seconds = Annotated[float, Field(ge=0), _at_most(MAX_SECONDS)]
Parallel = Annotated[int, Field(ge=1), _at_most(MAX_PARALLEL)]
Percent = Annotated[float, Field(ge=0), _at_most(100.0)]
Gigabytes = Annotated[float, Field(ge=0), _at_most(65_536.0)]
Bytes = Annotated[int, Field(ge=0), _at_most(2**50)]
Tokens = Annotated[int, Field(ge=0), _at_most(10_000_000)]
Jobs = Annotated[int, Field(ge=0), _at_most(100_000)]


def is_valid_agent_id(value: str) -> bool:
    """True when ``value`` is safe as an MQTT topic level and username."""
    return bool(_ID_RE.match(value))


class Message(BaseModel):
    """Base of every payload: protocol version and sender's time.

    NaN and infinities are refused in every number (``allow_inf_nan=False``): a job whose deadline is NaN
    would otherwise put a NaN timer into the agent's event loop and run without a deadline (found by fuzzing).
    """

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    v: int = Field(default=PROTOCOL_VERSION, ge=1, description="Protocol version.")
    ts: float = Field(default_factory=time.time, description="Sender's UTC time, Unix seconds.")


# ---------------------------------------------------------------- agent → coordinator


RuntimeKind = Literal["ollama", "llama.cpp", "llama-cpp-python", "lm-studio", "vllm", "openai", "simulated"]


class RuntimeProfile(BaseModel):
    """What the agent learned about its inference runtime, and how it treats it (docs/runtimes.md).

    The coordinator routes on these facts: ``slots`` bounds how many jobs the runtime really runs at once (the
    agent queues the rest), ``continues_prefill`` decides whether a failover may continue a partial answer or
    must restart it.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    kind: RuntimeKind = "openai"
    detected_by: str = Field(default="", max_length=200, description="How the kind was learned (endpoint or flag).")
    version: str | None = Field(default=None, max_length=100)
    slots: int = Field(default=1, ge=1, le=64, description="Requests the runtime really runs at once.")
    slots_source: Literal["measured", "reported", "declared", "default"] = "default"
    continues_prefill: bool | None = Field(
        default=None, description="Continues a trailing assistant message (None: not probed)."
    )
    interrupts_running: bool | None = Field(
        default=None, description="A new request cuts a running stream short (llama-cpp-python's default)."
    )
    health_check: str = Field(default="", max_length=200, description="The request used to check health, and when.")


class Status(Message):
    """Presence of an agent; retained, and also the agent's last will."""

    state: Literal["online", "offline"]
    agent_version: Name = "unknown"
    backend: Name | None = Field(default=None, description="ollama, openai or simulated.")
    backend_url: BackendUrl | None = Field(default=None, description="Credentials shown as user:***@.")
    backend_reachable: bool | None = None
    backend_error: ErrorText | None = None
    simulated: bool = Field(default=False, description="True for the simulated backend (demos, benchmarks).")
    hostname: Hostname | None = None
    max_parallel: Parallel | None = None
    runtime: RuntimeProfile | None = Field(default=None, description="The runtime profile, once learned.")


class GpuInfo(BaseModel):
    """One GPU; unknown values stay ``None``."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    name: Name = "unknown"
    vendor: Name = Field(default="unknown", description="nvidia, amd, intel, apple or unknown.")
    vram_total_gb: Annotated[float, Field(ge=0), _at_most(2048.0)] | None = None
    vram_free_gb: Annotated[float, Field(ge=0), _at_most(2048.0)] | None = None
    unified_memory: bool = Field(default=False, description="GPU shares system RAM (Apple Silicon).")
    memory_bandwidth_gbps: Annotated[float, Field(ge=0), _at_most(20_000.0)] | None = None


class Benchmark(BaseModel):
    """Generation speed the agent measured on its own backend."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    model: Name
    tokens_per_s: TokensPerSecond
    ttft_s: Seconds | None = None
    measured_at: float = Field(default_factory=time.time)


class Hardware(Message):
    """What the machine can do; retained. Fields the probe could not read are ``None``."""

    cpu_brand: Name | None = None
    cpu_physical_cores: Annotated[int, Field(ge=0), _at_most(1024)] | None = None
    cpu_logical_cores: Annotated[int, Field(ge=0), _at_most(4096)] | None = None
    cpu_max_ghz: Annotated[float, Field(ge=0), _at_most(10.0)] | None = None
    ram_total_gb: Gigabytes | None = None
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=MAX_GPUS)
    os: Name | None = None
    arch: Name | None = None
    hostname: Hostname | None = None
    declared: bool = Field(default=False, description="True when read from --hardware-profile, not probed.")
    benchmark: Benchmark | None = None


class Telemetry(Message):
    """Load every few seconds; QoS 0, not retained."""

    cpu_percent: Percent | None = None
    ram_used_gb: Gigabytes | None = None
    ram_free_gb: Gigabytes | None = None
    gpu_util_percent: Percent | None = None
    vram_free_gb: Gigabytes | None = None
    jobs_running: Jobs = 0
    jobs_queued: Jobs = 0
    max_parallel: Parallel | None = None
    tokens_per_s: TokensPerSecond | None = Field(default=None, description="Recent generation speed per stream.")
    ttft_s: Seconds | None = Field(default=None, description="Recent time to first token.")
    backend_reachable: bool | None = None
    simulated: bool = False
    interval_s: Annotated[float, Field(gt=0), _at_most(3600.0)] = Field(
        default=2.0, description="Seconds until the next telemetry message.")


ModelStateName = Literal["absent", "pulling", "loading", "ready", "failed"]


class ModelState(Message):
    """State of the assigned model; retained."""

    model: Name | None = None
    state: ModelStateName
    progress: float | None = Field(default=None, ge=0, le=1)
    completed_bytes: Bytes | None = None
    total_bytes: Bytes | None = None
    error: ErrorText | None = None
    local_models: list[Name] = Field(default_factory=list, max_length=MAX_MODELS)
    assignment_id: str | None = Field(default=None, max_length=100)
    loaded_models: list[Name] = Field(
        default_factory=list, max_length=MAX_MODELS,
        description="Models in the runtime's memory now (Ollama /api/ps), when it says.",
    )


class ResultStats(BaseModel):
    """Usage and timing, on the last chunk of an answer."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    prompt_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    ttft_s: Seconds | None = None
    tokens_per_s: TokensPerSecond | None = None
    total_s: Seconds | None = None
    queue_s: Seconds | None = Field(
        default=None, description="Time the job waited at the agent for a free slot (included in ttft_s)."
    )
    finish_reason: str | None = Field(
        default=None, max_length=32, description="The runtime's own reason: stop, length, ... (Ollama done_reason)."
    )
    tokens_counted_by: Literal["runtime", "agent"] | None = Field(
        default=None, description="agent: the runtime sent no usage, the agent counted streamed pieces."
    )


ErrorCode = Literal[
    "bad_job",
    "model_not_served",
    "model_missing",
    "backend_down",
    "backend_error",
    "context_too_long",
    "deadline",
    "cancelled",
    "busy",
    "stalled",
    "truncated",
    "internal",
]


class Result(Message):
    """One chunk of an answer. ``seq`` counts from 0; the last chunk has ``done``."""

    request_id: RequestId
    seq: int = Field(ge=0)
    delta: str = ""
    done: bool = False
    error: ErrorText | None = None
    error_code: ErrorCode | None = None
    stats: ResultStats | None = None
    agent_id: AgentId | None = None
    model: Name | None = None


# ---------------------------------------------------------------- coordinator → agent


class Assign(Message):
    """The model an agent should serve; retained so a restarted agent gets it back."""

    model: str = Field(min_length=1, max_length=200)
    assignment_id: str = Field(min_length=1, max_length=100)
    reason: ErrorText = ""
    also: list[Name] = Field(
        default_factory=list, max_length=8,
        description="Further models to keep on this machine where memory allows (pulled after `model` is "
        "ready, never at its expense); a change of `also` alone does not re-prepare `model`.",
    )


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class Job(Message):
    """A query for one agent. ``assistant_prefix`` continues a partial answer after failover."""

    request_id: RequestId
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    options: dict[str, Any] = Field(default_factory=dict)
    deadline: float = Field(description="Unix seconds; the agent drops the job after it.")
    assistant_prefix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    attempt: int = Field(default=0, ge=0)


class Cancel(Message):
    """Stop a running job."""

    request_id: RequestId
    reason: ErrorText | None = None


ManageAction = Literal["pull", "delete", "load", "unload"]


class Manage(Message):
    """Model management on one agent's runtime (Ollama's /api/pull, /api/delete, load, keep_alive 0)."""

    request_id: RequestId
    action: ManageAction
    model: str = Field(min_length=1, max_length=200)


class Operation(Message):
    """Progress and outcome of a :class:`Manage` request; the last message has ``done``."""

    request_id: RequestId
    action: ManageAction
    model: str = Field(min_length=1, max_length=200)
    status: str = Field(default="", max_length=200, description="Ollama-style: pulling manifest, success, ...")
    completed_bytes: int | None = Field(default=None, ge=0)
    total_bytes: int | None = Field(default=None, ge=0)
    done: bool = False
    error: str | None = Field(default=None, max_length=2000)


class CoordinatorStatus(Message):
    """Presence of the coordinator; retained, and also its last will."""

    state: Literal["online", "offline"]
    coordinator_version: Name = "unknown"

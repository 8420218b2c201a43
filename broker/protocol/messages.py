"""One frozen pydantic model per topic (see docs/protocol.md).

Every message carries ``v`` (protocol version) and ``ts`` (sender's Unix time).
Unknown fields are ignored so that newer senders stay readable by older readers.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

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
# Images and embeddings (version 1 extensions, docs/protocol.md). A job is one MQTT message (1 MiB at most), so a
# job's images share that with its text; the app checks the sum before it sends (docs/api.md, "Images").
MAX_IMAGES = 8
MAX_IMAGE_CHARS = 1_000_000
"""Base64 characters of one image on the wire."""
MAX_EMBED_INPUTS = 256
"""Texts in one embed job, and vectors in one result chunk."""
MAX_VECTOR_VALUES = 262_144
"""Numbers in one vector (a runtime without pooling gives one vector per token: a list of lists)."""
MAX_EPOCH = 2**53
"""Largest leadership epoch (exact in every JSON reader); epochs are milliseconds since 1970 or more."""

Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]


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
ImageData = Annotated[str, StringConstraints(min_length=1, max_length=MAX_IMAGE_CHARS)]
Vector = Annotated[list[float], Field(max_length=MAX_VECTOR_VALUES)] | Annotated[
    list[Annotated[list[float], Field(max_length=MAX_VECTOR_VALUES)]], Field(max_length=MAX_VECTOR_VALUES)]
"""One input's embedding: a list of numbers, or (a runtime without pooling) one list per token."""


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
    also: list[Name] = Field(
        default_factory=list, max_length=8,
        description="The `also` of the assignment this state answers, so a coordinator that never read the retained "
        "assignment (a broker without retained replay to wildcards) can adopt it unchanged.",
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


MAX_TOOLS = 128
"""Tool definitions one job may carry (Open WebUI sends ~36 with every chat)."""
MAX_TOOL_CALLS = 64


class ToolCall(BaseModel):
    """One complete function call of an answer (version 1 extension, docs/protocol.md "Tools").

    ``arguments`` is the JSON text as the runtime produced it (OpenAI's dialect); an Ollama runtime's argument
    object is serialized compactly, so each API can give it back in its own dialect without losing anything.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    id: str | None = Field(default=None, max_length=200)
    name: Name
    arguments: str = Field(default="{}", max_length=MAX_PROMPT_CHARS)


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
    tool_calls: list[ToolCall] | None = Field(
        default=None, max_length=MAX_TOOL_CALLS,
        description="Complete function calls of the answer, on its last chunk; version 1 extension.",
    )
    embeddings: list[Vector] | None = Field(
        default=None, max_length=MAX_EMBED_INPUTS,
        description="An embed job's vectors as the runtime gave them; version 1 extension.",
    )
    embedding_index: int = Field(default=0, ge=0, description="Input index of the first vector in this chunk.")


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
    epoch: Epoch = Field(
        default=0, description="Leadership epoch of the coordinator that placed it; an agent ignores an assignment "
        "whose epoch is lower than the highest it has seen (a deposed leader cannot move models).",
    )


class ChatMessage(BaseModel):
    """One turn of a conversation. ``tool_calls`` (assistant) and ``tool_call_id`` / ``name`` (tool results) are
    version 1 extensions with defaults, so older senders and readers stay compatible."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = Field(default=None, max_length=200)
    name: Name | None = Field(default=None, description="The tool whose result this is (role tool).")
    images: list[ImageData] = Field(
        default_factory=list, max_length=MAX_IMAGES,
        description="Images for a vision model, base64 without a data: prefix; version 1 extension.",
    )


class Job(Message):
    """A query for one agent. ``assistant_prefix`` continues a partial answer after failover."""

    request_id: RequestId
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(default_factory=list, max_length=1000)
    options: dict[str, Any] = Field(default_factory=dict)
    deadline: float = Field(description="Unix seconds; the agent drops the job after it.")
    assistant_prefix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    attempt: int = Field(default=0, ge=0)
    tools: list[dict[str, Any]] | None = Field(
        default=None, max_length=MAX_TOOLS,
        description="Function definitions, OpenAI's shape ({type: function, function: {name, description, "
        "parameters}}, which Ollama takes as is); version 1 extension.",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="OpenAI's tool_choice: none, auto, required or {type: function, function: "
        "{name}}; version 1 extension.",
    )
    kind: Literal["chat", "embed"] = Field(
        default="chat", description="embed: vectors for ``inputs`` instead of an answer; version 1 extension.")
    inputs: list[Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]] = Field(
        default_factory=list, max_length=MAX_EMBED_INPUTS, description="The texts of an ``embed`` job.")
    format: Literal["json"] | dict[str, Any] | None = Field(
        default=None, description="Structured output: 'json' (any JSON value) or a JSON schema the answer must fit; "
        "Ollama's ``format``, sent to OpenAI-compatible runtimes as ``response_format``; version 1 extension.")
    think: bool | None = Field(
        default=None, description="Ollama's ``think`` (only false is sent: the answer carries no thinking text); "
        "version 1 extension.")
    keep_alive: str | float | None = Field(
        default=None, description="Ollama's ``keep_alive`` for this job (a duration such as '10m', or seconds; "
        "negative: keep loaded); None: the agent's own setting; version 1 extension.")

    @model_validator(mode="after")
    def _has_work(self) -> Job:
        """A chat job needs messages, an embed job inputs (their text within the bound of one job)."""
        if self.kind == "chat" and not self.messages:
            raise ValueError("a chat job needs messages (at least one)")
        if self.kind == "embed":
            if not self.inputs:
                raise ValueError("an embed job needs at least one input")
            if sum(len(text) for text in self.inputs) > MAX_PROMPT_CHARS:
                raise ValueError(f"an embed job's inputs exceed {MAX_PROMPT_CHARS} characters")
        return self


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
    epoch: Epoch = Field(default=0, description="The leadership epoch the sender knows; fenced like Assign.")


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


LeaderState = Literal["leader", "claim", "vacant"]


class LeaderRecord(Message):
    """Who leads placement (docs/protocol.md "Leadership").

    ``leader`` is retained by the holder's lease connection, whose last will is the same record with ``vacant``;
    ``claim`` (not retained) bids for a vacancy: after the claim window the best bid leads (highest epoch, then
    lowest id).
    """

    state: LeaderState
    coordinator_id: AgentId
    epoch: Epoch
    since: float | None = Field(default=None, description="Unix seconds the holder has led since.")

"""Pure tests of the wire protocol: topics, models, codec. No network."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.protocol import (
    Assign,
    Benchmark,
    Cancel,
    ChatMessage,
    CoordinatorStatus,
    GpuInfo,
    Hardware,
    Job,
    LeaderRecord,
    Manage,
    ModelState,
    Operation,
    PayloadError,
    Result,
    ResultStats,
    RuntimeProfile,
    Status,
    Telemetry,
    TopicKind,
    Topics,
    decode,
    encode,
    is_valid_agent_id,
)
from broker.protocol.codec import MAX_PAYLOAD_BYTES
from broker.protocol.messages import (
    MAX_ERROR_CHARS,
    MAX_GPUS,
    MAX_HOSTNAME_CHARS,
    MAX_MODELS,
    MAX_NAME_CHARS,
    MAX_PARALLEL,
    MAX_SECONDS,
    MAX_TOKENS_PER_S,
    MAX_URL_CHARS,
)

EXAMPLES = [
    Status(state="online", agent_version="0.1.0", backend="ollama", backend_url="http://127.0.0.1:11434",
           runtime=RuntimeProfile(kind="llama-cpp-python", slots=1, slots_source="measured",
                                  continues_prefill=False, interrupts_running=True)),
    Hardware(
        cpu_brand="AMD Ryzen 9 7950X",
        cpu_physical_cores=16,
        cpu_logical_cores=32,
        cpu_max_ghz=5.7,
        ram_total_gb=64,
        gpus=[GpuInfo(name="NVIDIA GeForce RTX 4090", vendor="nvidia", vram_total_gb=24, vram_free_gb=23.1)],
        os="Linux",
        arch="x86_64",
        benchmark=Benchmark(model="llama3.1:8b", tokens_per_s=120.5, ttft_s=0.05),
    ),
    Telemetry(cpu_percent=12.5, ram_used_gb=10, ram_free_gb=54, jobs_running=1, jobs_queued=2, tokens_per_s=98.0),
    ModelState(model="llama3.2:3b", state="pulling", progress=0.42, completed_bytes=42, total_bytes=100),
    Result(request_id="r1", seq=3, delta="Hello", done=True,
           stats=ResultStats(prompt_tokens=5, output_tokens=7, finish_reason="length", tokens_counted_by="agent")),
    Operation(request_id="m1", action="pull", model="qwen2.5:0.5b", status="downloading", completed_bytes=5,
              total_bytes=10),
    Assign(model="llama3.1:8b", assignment_id="a-1", reason="score 92 >= 80"),
    Job(
        request_id="r1",
        model="llama3.2:1b",
        messages=[ChatMessage(role="user", content="hi")],
        options={"temperature": 0.2},
        deadline=2e9,
        assistant_prefix="Hel",
    ),
    Cancel(request_id="r1"),
    Manage(request_id="m1", action="unload", model="qwen2.5:0.5b"),
    CoordinatorStatus(state="online"),
    LeaderRecord(state="leader", coordinator_id="coordinator.1a2b", epoch=1795680000000, since=1795680000.0),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_model_round_trips(message) -> None:
    assert decode(type(message), encode(message)) == message


def test_every_topic_kind_is_bound_to_a_model_with_qos_and_retain() -> None:
    topics = Topics("slb/v1")
    assert {kind.spec.model for kind in TopicKind} == {type(m) for m in EXAMPLES}
    for kind in TopicKind:
        agent = None if kind.spec.direction == "coordinator" else "desk-pc"
        topic = topics.for_kind(kind, agent)
        assert topics.parse(topic) == (kind, agent)
    assert TopicKind.TELEMETRY.spec.qos == 0 and not TopicKind.TELEMETRY.spec.retained
    assert TopicKind.STATUS.spec.retained and TopicKind.ASSIGN.spec.retained
    assert not TopicKind.JOB.spec.retained and TopicKind.JOB.spec.qos == 1


def test_topic_builders_match_the_design() -> None:
    topics = Topics()
    assert topics.status("a1") == "slb/v1/agent/a1/status"
    assert topics.result("a1") == "slb/v1/agent/a1/result"
    assert topics.assign("a1") == "slb/v1/control/a1/assign"
    assert topics.job("a1") == "slb/v1/control/a1/job"
    assert topics.cancel("a1") == "slb/v1/control/a1/cancel"
    assert topics.coordinator_status() == "slb/v1/coordinator/status"
    assert topics.all_agents() == "slb/v1/agent/+/+"
    assert topics.control_of("a1") == "slb/v1/control/a1/+"
    assert Topics("home/lab/").job("x") == "home/lab/control/x/job"


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "a+b", "", " x", "x" * 65, "../x", "a b"])
def test_ids_with_wildcards_or_separators_are_refused(bad: str) -> None:
    assert not is_valid_agent_id(bad)
    with pytest.raises(ValueError):
        Topics().job(bad)
    with pytest.raises(PayloadError):
        decode(Cancel, json.dumps({"v": 1, "ts": 0, "request_id": bad}).encode())


def test_parse_rejects_foreign_and_malformed_topics() -> None:
    topics = Topics()
    for topic in ["other/v1/agent/a/status", "slb/v1/agent/a/unknown", "slb/v1/agent/a+b/status",
                  "slb/v1/agent/a/status/extra", "slb/v1/control/a/status", "slb/v1"]:
        assert topics.parse(topic) is None


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", "empty"),
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00garbage", "not_json"),
        (b"[1, 2, 3]", "invalid"),
        (b'{"v": 1, "ts": 0}', "invalid"),  # missing fields
        (b'{"v": 1, "ts": 0, "request_id": "r", "seq": "three"}', "invalid"),  # wrong type
        (b'{"v": 1, "ts": 0, "request_id": "r", "seq": -1}', "invalid"),  # out of range
        (b'{"v": 0, "ts": 0, "request_id": "r", "seq": 1}', "invalid"),  # bad version
        (b"x" * (1024 * 1024 + 1), "too_large"),  # 1 MB of junk
    ],
)
def test_bad_payloads_raise_the_typed_error(payload: bytes, kind: str) -> None:
    with pytest.raises(PayloadError) as caught:
        decode(Result, payload, topic="slb/v1/agent/a/result")
    assert caught.value.kind == kind
    assert caught.value.topic == "slb/v1/agent/a/result"


def test_unknown_fields_are_ignored_and_messages_are_frozen() -> None:
    message = decode(Cancel, b'{"v": 1, "ts": 5, "request_id": "r9", "future_field": {"x": 1}}')
    assert message.request_id == "r9" and message.ts == 5
    with pytest.raises(ValidationError):
        message.request_id = "other"  # type: ignore[misc]


def test_oversized_prompt_is_refused() -> None:
    job = {"v": 1, "ts": 0, "request_id": "r", "model": "m", "deadline": 1,
           "messages": [{"role": "user", "content": "x" * 500_000}]}
    with pytest.raises(PayloadError):
        decode(Job, json.dumps(job).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_payload_error(data: bytes) -> None:
    for model in (Status, Hardware, Telemetry, ModelState, Result, Assign, Job, Cancel):
        try:
            decode(model, data)
        except PayloadError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "ts", "request_id", "seq", "delta", "done", "model", "messages",
                                         "deadline", "state", "progress", "gpus", "stats"]), json_values))
def test_adversarial_json_objects_give_payload_error_or_a_valid_message(obj: dict) -> None:
    data = json.dumps(obj).encode()
    for model in (Status, Hardware, ModelState, Result, Job):
        try:
            message = decode(model, data)
        except PayloadError:
            continue
        assert decode(model, encode(message)) == message


# -- what an agent may claim is bounded (issue 13.6) -----------------------------------------------------------


def test_a_retained_hardware_message_with_17500_gpus_is_refused() -> None:
    """One such message (just under 1 MiB) made /status 1.47 MB; it must be dropped, not stored."""
    gpu = {"name": "H100", "vendor": "nvidia", "vram_total_gb": 80.0}
    payload = json.dumps({"v": 1, "ts": 0, "cpu_brand": "x", "gpus": [gpu] * 17_500}, separators=(",", ":"))
    assert len(payload) < MAX_PAYLOAD_BYTES  # the codec's size limit alone lets it through
    with pytest.raises(PayloadError) as refused:
        decode(Hardware, payload, topic="slb/v1/agent/liar/hardware")
    assert refused.value.kind == "invalid" and "gpus" in refused.value.reason
    assert len(decode(Hardware, json.dumps({"gpus": [gpu] * MAX_GPUS})).gpus) == MAX_GPUS


REFUSED = [  # (model, payload fields): one field just over its limit; the message is dropped whole
    (Hardware, {"gpus": [{"name": "g"}] * (MAX_GPUS + 1)}),
    (Hardware, {"gpus": [{"name": "g" * (MAX_NAME_CHARS + 1)}]}),
    (Hardware, {"gpus": [{"vendor": "v" * (MAX_NAME_CHARS + 1)}]}),
    (Hardware, {"cpu_brand": "c" * (MAX_NAME_CHARS + 1)}),
    (Hardware, {"hostname": "h" * (MAX_HOSTNAME_CHARS + 1)}),
    (Hardware, {"os": "o" * (MAX_NAME_CHARS + 1)}),
    (Hardware, {"arch": "a" * (MAX_NAME_CHARS + 1)}),
    (Hardware, {"benchmark": {"model": "m" * (MAX_NAME_CHARS + 1), "tokens_per_s": 1}}),
    (ModelState, {"state": "ready", "local_models": ["m"] * (MAX_MODELS + 1)}),
    (ModelState, {"state": "ready", "loaded_models": ["m"] * (MAX_MODELS + 1)}),
    (ModelState, {"state": "ready", "local_models": ["m" * (MAX_NAME_CHARS + 1)]}),
    (ModelState, {"state": "ready", "model": "m" * (MAX_NAME_CHARS + 1)}),
    (ModelState, {"state": "ready", "assignment_id": "a" * 101}),
    (Status, {"state": "online", "hostname": "h" * (MAX_HOSTNAME_CHARS + 1)}),
    (Status, {"state": "online", "agent_version": "v" * (MAX_NAME_CHARS + 1)}),
    (Status, {"state": "online", "backend": "b" * (MAX_NAME_CHARS + 1)}),
    (Status, {"state": "online", "backend_url": "http://h/" + "p" * MAX_URL_CHARS}),
    (Result, {"request_id": "r1", "seq": 0, "model": "m" * (MAX_NAME_CHARS + 1)}),
    (CoordinatorStatus, {"state": "online", "coordinator_version": "v" * (MAX_NAME_CHARS + 1)}),
]


@pytest.mark.parametrize(("model", "fields"), REFUSED, ids=lambda value: str(value)[:40])
def test_lists_and_names_over_their_limit_are_refused(model, fields) -> None:
    with pytest.raises(PayloadError) as refused:
        decode(model, json.dumps(fields))
    assert refused.value.kind == "invalid"


CLAMPED = [  # (model, payload fields, path to the value, what it becomes): measurements, bounded not refused
    (Hardware, {"benchmark": {"model": "m", "tokens_per_s": 100_000}}, ("benchmark", "tokens_per_s"),
     MAX_TOKENS_PER_S),
    (Hardware, {"benchmark": {"model": "m", "tokens_per_s": 1, "ttft_s": 1e9}}, ("benchmark", "ttft_s"),
     MAX_SECONDS),
    (Hardware, {"cpu_physical_cores": 10**9}, ("cpu_physical_cores",), 1024),
    (Hardware, {"cpu_logical_cores": 10**9}, ("cpu_logical_cores",), 4096),
    (Hardware, {"cpu_max_ghz": 1e6}, ("cpu_max_ghz",), 10.0),
    (Hardware, {"ram_total_gb": 1e12}, ("ram_total_gb",), 65_536.0),
    (Telemetry, {"tokens_per_s": 1e7}, ("tokens_per_s",), MAX_TOKENS_PER_S),
    (Telemetry, {"max_parallel": 1000}, ("max_parallel",), MAX_PARALLEL),
    (Telemetry, {"cpu_percent": 1e6, "gpu_util_percent": 500}, ("cpu_percent",), 100.0),
    (Telemetry, {"jobs_queued": 10**12}, ("jobs_queued",), 100_000),
    (Telemetry, {"interval_s": 1e9}, ("interval_s",), 3600.0),
    (Status, {"state": "online", "max_parallel": 1000}, ("max_parallel",), MAX_PARALLEL),
    (Result, {"request_id": "r", "seq": 0, "stats": {"tokens_per_s": 1e9, "output_tokens": 10**12}},
     ("stats", "tokens_per_s"), MAX_TOKENS_PER_S),
]


@pytest.mark.parametrize(("model", "fields", "path", "expected"), CLAMPED, ids=lambda value: str(value)[:40])
def test_claimed_numbers_are_bounded_to_sane_ranges(model, fields, path, expected) -> None:
    """A measurement spike (two pieces a microsecond apart) must not silence an honest agent: capped, not refused."""
    value = decode(model, json.dumps(fields))
    for part in path:
        value = getattr(value, part)
    assert value == expected


def test_error_texts_are_cut_to_their_limit_and_urls_lose_their_credentials() -> None:
    long_error = "backend said: " + "x" * 10_000
    status = decode(Status, json.dumps({"state": "online", "backend_error": long_error,
                                        "backend_url": "http://admin:hunter2@gpu-box:11434/"}))
    assert len(status.backend_error) == MAX_ERROR_CHARS and status.backend_error.endswith("…")
    assert status.backend_url == "http://admin:***@gpu-box:11434/"
    assert len(Result(request_id="r1", seq=0, error=long_error).error) == MAX_ERROR_CHARS
    assert len(ModelState(state="failed", error=long_error).error) == MAX_ERROR_CHARS
    status = Status(state="online", backend_error="backend unreachable at http://u:s3cret@h:1: refused")
    assert "s3cret" not in status.backend_error and "http://u:***@h:1" in status.backend_error

"""The wire protocol on its own: encodings, validation rules, fuzzing."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagebus.protocol import (
    Dialect,
    ImageParams,
    JobStatus,
    Limits,
    ProtocolError,
    RequestError,
    TaskAssignment,
    TaskResult,
    TaskStatus,
    decode,
    decode_request,
    dialect_of,
    encode,
    encode_request,
    events,
    request_headers,
    results,
    validate_request,
)
from imagebus.protocol import subjects as s
from imagebus.protocol.auth import EventKey, assignment_key, new_secret

LIMITS = Limits()


def test_messages_round_trip_through_msgpack() -> None:
    params = ImageParams("p", 64, 64, 4, 7.5, negative_prompt="n", model="tiny")
    assignment = TaskAssignment("job", 2, 42, params, "_INBOX.abc", "native", "res", "rep")
    assert decode(TaskAssignment, encode(assignment)) == assignment
    result = TaskResult("job", 0, True, 5, "w", png=b"\x89PNG", width=8, height=8)
    assert decode(TaskResult, encode(result)) == result
    status = JobStatus("job", "done", 1, 1, 0, "p", "2026-01-01", None, [TaskStatus(0, 5, "done")])
    assert decode(JobStatus, encode(status)) == status
    # The fast encoder writes exactly what dataclasses.asdict would.
    for message in (assignment, result, status):
        assert encode(message) == msgpack.packb(dataclasses.asdict(message), use_bin_type=True)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"job_id": "j"}),
        msgpack.packb({"job_id": 1, "index": 0, "ok": True, "seed": 1}),
        msgpack.packb({"job_id": "j", "index": True, "ok": True, "seed": 1}),
    ],
)
def test_malformed_messages_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(TaskResult, payload)


def test_legacy_request_uses_prototype_field_names() -> None:
    body = json.dumps({"prompt": "cat", "numSteps": 4, "height": 128, "width": 256}).encode()
    request = decode_request(body, Dialect.LEGACY, LIMITS)
    assert (request.params.steps, request.params.width, request.params.height) == (4, 256, 128)
    assert request.n == 1 and request.seed is None


def test_seed_range_leaves_room_for_every_image() -> None:
    with pytest.raises(RequestError) as error:
        decode_request(
            msgpack.packb({"prompt": "x", "n": 4, "seed": 2**32 - 2}), Dialect.NATIVE, LIMITS
        )
    assert error.value.field == "seed"


def test_integral_floats_are_accepted_as_integers() -> None:
    body = json.dumps({"prompt": "x", "numSteps": 4.0, "width": 64.0, "height": 64}).encode()
    assert decode_request(body, Dialect.LEGACY, LIMITS).params.steps == 4


def test_only_inboxes_may_receive_results() -> None:
    assert s.is_valid_inbox("_INBOX.abc123")
    assert s.is_valid_inbox("_INBOX.abc.def")
    for subject in ["img-gen", "_INBOX.*", "_INBOX.>", "_INBOX.", "_INBOX..x", "x" * 300, ""]:
        assert not s.is_valid_inbox(subject), subject


def test_legacy_events_match_the_prototype() -> None:
    progress = events.progress(Dialect.LEGACY, "_INBOX.a", _progress(step=1, steps=4))
    assert (progress.subject, progress.payload) == ("_INBOX.a.worker-progress", b"25.0")
    ok = events.result(Dialect.LEGACY, "_INBOX.a", TaskResult("j", 0, True, 1, "w", png=b"PNG"))
    assert ok.subject == "_INBOX.a" and ok.payload == b"PNG"
    assert ok.headers["success"] == "true" and ok.headers["mimetype"] == "image/png"
    failed = events.result(Dialect.LEGACY, "_INBOX.a", TaskResult("j", 0, False, 1, error="boom"))
    assert failed.headers["success"] == "false" and failed.payload == b"boom"


def _progress(step: int, steps: int) -> Any:
    from imagebus.protocol import TaskProgress

    return TaskProgress("j", 0, step, steps, "w")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt": json_values | st.text(max_size=50),
        "width": json_values | st.integers(-100, 5000),
        "height": json_values | st.integers(-100, 5000),
        "steps": json_values | st.integers(-5, 500),
        "numSteps": json_values,
        "n": json_values | st.integers(-5, 200),
        "seed": json_values | st.integers(-(2**40), 2**40),
        "guidance": json_values,
        "model": json_values,
        "negative_prompt": json_values,
    },
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=request_like | json_values, raw=st.binary(max_size=64), mutate=st.integers(0, 2))
def test_fuzzed_requests_either_validate_or_raise_request_error(
    body: Any, raw: bytes, mutate: int
) -> None:
    for dialect in (Dialect.NATIVE, Dialect.LEGACY):
        if mutate == 0:
            payload = raw
        elif dialect is Dialect.NATIVE:
            payload = msgpack.packb(body)
        else:
            payload = json.dumps(body).encode()
        if mutate == 2 and payload:
            payload = payload[: len(payload) // 2] + raw[:4]
        try:
            request = decode_request(payload, dialect, LIMITS)
        except RequestError as error:
            assert str(error)
            continue
        params = request.params
        assert params.prompt.strip() and len(params.prompt) <= LIMITS.max_prompt_chars
        assert 8 <= params.width <= LIMITS.max_width and params.width % 8 == 0
        assert 8 <= params.height <= LIMITS.max_height and params.height % 8 == 0
        assert 1 <= params.steps <= LIMITS.max_steps and 1 <= request.n <= LIMITS.max_images


def test_kept_images_reassemble_only_when_whole_and_matching() -> None:
    png = bytes(range(256)) * 40  # 10 KiB, kept in 2 KiB chunks below
    messages = results.copy_messages("job1", 3, png, max_payload=2048 + 1024)
    assert len(messages) == 5
    stored = [(m.subject, m.headers, m.payload) for m in messages]
    assert results.assemble(reversed(stored)).images == {3: png}  # order does not matter
    assert results.assemble(stored[:-1]).images == {}  # a chunk missing: no copy
    tampered = [*stored[:-1], (stored[-1][0], stored[-1][1], b"x" * len(stored[-1][2]))]
    assert results.assemble(tampered).images == {}  # digest mismatch: no copy
    other = results.copy_messages("job1", 0, b"small", max_payload=1 << 20)
    both = [*stored, *[(m.subject, m.headers, m.payload) for m in other]]
    assert results.assemble(both).images == {0: b"small", 3: png}


def test_a_kept_copy_verifies_under_its_assignments_key_only() -> None:
    """Chunks of a forged copy interleaved with the real one's do not mix with them; the
    first copy that verifies wins, even when a forged one comes first or last."""
    secret, png = new_secret(), bytes(range(256)) * 40
    key = EventKey(assignment_key(secret, "job1", 3, 2), attempt=2)
    real = results.copy_messages("job1", 3, png, max_payload=2048 + 1024, key=key)
    assert len({m.headers[s.HEADER_MSG_ID] for m in real}) == 5
    assert real[0].headers[s.HEADER_MSG_ID].startswith("job1.3.2.")  # its MAC in it
    wrong_image = EventKey(assignment_key(secret, "job1", 2, 2), attempt=2)
    forgeries = [
        results.copy_messages("job1", 3, b"forged", max_payload=1 << 20),  # no MAC
        results.copy_messages("job1", 3, b"forged", 1 << 20, key=wrong_image),
        results.copy_messages("job1", 3, b"forged", 1 << 20, key=EventKey(new_secret(), 1)),
    ]
    stored = [(m.subject, m.headers, m.payload) for m in [*forgeries[0], *real, *forgeries[1]]]
    stored.insert(2, *[(m.subject, m.headers, m.payload) for m in forgeries[2]])
    kept = results.assemble(stored, results.verified_by(secret, "job1"))
    assert kept.images == {3: png}
    assert [index for index, _ in kept.skipped] == [3, 3, 3]
    assert results.assemble(stored).images == {3: b"forged"}  # unchecked: the first
    assert results.assemble(stored, results.verified_by(new_secret(), "job1")).images == {}


REQUEST_OPTIONS: list[dict[str, Any]] = [
    {},
    {"n": 3, "width": 64, "height": 48, "steps": 4, "guidance": 2.5, "seed": 9},
    {"negative_prompt": "blur", "model": "tiny", "preset": "tiny", "device": "cuda"},
    {"min_vram_gb": 8.0, "task_timeout": 30.0, "job_timeout": 60.0, "queue_timeout": 5.0},
]


@pytest.mark.parametrize("options", REQUEST_OPTIONS)
def test_an_encoded_request_decodes_to_the_request_asked_for(options: dict[str, Any]) -> None:
    payload = encode_request("a lighthouse", **options)
    decoded = decode_request(payload, Dialect.NATIVE, LIMITS)
    requirements = {k: options.pop(k) for k in ("device", "min_vram_gb") if k in options}
    as_dict = {"prompt": "a lighthouse", **options}
    if requirements:
        as_dict["requirements"] = requirements
    assert decoded == validate_request(as_dict, LIMITS)


def test_an_encoded_request_keeps_the_bytes_the_orchestrators_read() -> None:
    payload = encode_request(["a", "b"], n=2, seed=1, device="cpu", queue_timeout=3.0)
    # Fields left as None are left out; the others in this order (the prototype's
    # clients and every orchestrator read this map).
    expected = {"prompt": ["a", "b"], "n": 2, "seed": 1, "requirements": {"device": "cpu"},
                "queue_timeout": 3.0}  # fmt: skip
    assert payload == msgpack.packb(expected, use_bin_type=True)
    assert decode_request(payload, Dialect.NATIVE, LIMITS).prompts == ["a", "b"]


def test_a_request_that_cannot_be_encoded_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="cannot be encoded"):
        encode_request("\ud800")  # a lone surrogate is not UTF-8
    with pytest.raises(RequestError, match="cannot be encoded"):
        encode_request("x", model=object())  # type: ignore[arg-type]


def test_request_headers_name_the_events_inbox_and_the_native_encoding() -> None:
    headers = request_headers("_INBOX.abc.123")
    assert headers[s.HEADER_IMAGE_INBOX] == headers[s.HEADER_MSG_ID] == "_INBOX.abc.123"
    assert dialect_of(headers) is Dialect.NATIVE


def test_control_answers_round_trip_and_errors_are_told_apart() -> None:
    from imagebus.protocol import control

    lag = control.LoopLagSummary(0.1, 0.5, 2.0, 40)
    stats = control.OrchestratorStats("o-1", 1, 2, 0, 9, 3, None, 4, lag)
    schema = control.SchemaAnswer({"type": "object", "properties": {"n": {"minimum": 1}}})
    for answer in [stats, schema, control.OrchestratorPong("o-1"), control.BlacklistAnswer()]:
        assert control.read_answer(type(answer), encode(answer), None) == answer
    payload, headers = control.error_answer(control.ControlErrorCode.NOT_FOUND, "no job 'x'")
    error = control.read_answer(JobStatus, payload, headers)
    assert error == control.ControlError("not_found", "no job 'x'")
    # An error from an older orchestrator (a text body) still reads as one.
    assert control.read_answer(JobStatus, b"gone", headers) == control.ControlError(
        "not_found", "gone"
    )
    with pytest.raises(ProtocolError):  # a schema must be a map
        decode(control.SchemaAnswer, msgpack.packb({"schema": [1, 2]}))
    # A query with nothing to say may come empty: it has its defaults.
    assert control.read_query(control.StatsQuery, b"") == control.StatsQuery(reset=False)
    assert control.read_query(control.StatsQuery, control.query_payload()) == control.StatsQuery()
    reset = control.query_payload(control.StatsQuery(reset=True))
    assert control.read_query(control.StatsQuery, reset).reset

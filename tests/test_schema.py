"""Every rule of the published JSON Schema is enforced, and the error names the field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from imagebus.protocol import Dialect, Limits, RequestError, decode_request, request_schema

LIMITS = Limits()
SCHEMA = request_schema(LIMITS)
VALID: dict[str, Any] = {"prompt": "ok", "width": 64, "height": 64, "steps": 2}


def _violations(rules: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(rule, a value breaking it) for each rule of one property's schema."""
    kind = rules.get("type")
    wrong_type = {"integer": "12", "number": "x", "string": 42, "object": "x", "array": "x"}
    wrong_type["boolean"] = "yes"
    if kind:
        yield "type", wrong_type[kind]
    if kind == "integer":
        yield "type (fraction)", 1.5
    if "minimum" in rules:
        yield "minimum", rules["minimum"] - 1
    if "exclusiveMinimum" in rules:
        yield "exclusiveMinimum", rules["exclusiveMinimum"]
    if "maximum" in rules:
        yield "maximum", rules["maximum"] + 1
    if "multipleOf" in rules:
        yield "multipleOf", rules["minimum"] + rules["multipleOf"] // 2
    if "minLength" in rules:
        yield "minLength", ""
    if "maxLength" in rules:
        yield "maxLength", "x" * (rules["maxLength"] + 1)
    if "enum" in rules:
        yield "enum", "no-such-value"
    if "minItems" in rules:
        yield "minItems", []
    if "maxItems" in rules:
        yield "maxItems", ["p"] * (rules["maxItems"] + 1)
    if "items" in rules:
        for rule, value in _violations(rules["items"]):
            yield f"items.{rule}", [value]
    if "oneOf" in rules:
        yield "oneOf (neither)", 42
        for option in rules["oneOf"]:
            # A wrong type for one branch may be the other branch's type.
            yield from ((r, v) for r, v in _violations(option) if not r.startswith("type"))


def _cases() -> Iterator[Any]:
    for name, rules in SCHEMA["properties"].items():
        for rule, value in _violations(rules):
            yield pytest.param({**VALID, name: value}, name, id=f"{name}-{rule}")
        for sub, sub_rules in rules.get("properties", {}).items():
            for rule, value in _violations(sub_rules):
                body = {**VALID, name: {sub: value}}
                yield pytest.param(body, f"{name}.{sub}", id=f"{name}.{sub}-{rule}")
        if rules.get("additionalProperties") is False:
            body = {**VALID, name: {"unknown": 1}}
            yield pytest.param(body, f"{name}.unknown", id=f"{name}-additionalProperties")
    yield pytest.param({**VALID, "unknown": 1}, "unknown", id="additionalProperties")
    body = {k: v for k, v in VALID.items() if k not in SCHEMA["required"]}
    yield pytest.param(body, "prompt", id="required")


@pytest.mark.parametrize(("body", "field"), list(_cases()))
def test_a_request_breaking_a_schema_rule_is_rejected_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(RequestError) as rejected:
        decode_request(msgpack.packb(body), Dialect.NATIVE, LIMITS)
    assert rejected.value.field == field, str(rejected.value)


def test_the_schema_accepts_what_the_validator_accepts() -> None:
    full = {
        **VALID,
        "prompt": ["a", "b"],
        "negative_prompt": "blur",
        "guidance": 0,
        "n": 2,
        "seed": 0,
        "model": "tiny",
        "preset": "tiny",
        "requirements": {"device": "cpu", "min_vram_gb": 0},
        "task_timeout": 1,
        "job_timeout": 2.5,
        "queue_timeout": 3,
        "trusted_only": True,
    }
    assert set(full) <= set(SCHEMA["properties"])
    request = decode_request(msgpack.packb(full), Dialect.NATIVE, LIMITS)
    assert request.prompts == ["a", "b"] and request.requirements.device == "cpu"
    assert request.trusted_only

"""A property-based fuzz of the web role's OpenAPI document (schemathesis): valid and
invalid bodies, paths and queries for every documented operation, against a real
server on a real bus. The server must never answer 500, and must answer only
statuses its document lists. Bounded (FUZZ_EXAMPLES per operation and mode, five
times that for operations with a body)."""

from __future__ import annotations

import asyncio
import os

import httpx
import hypothesis
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.schemas import APIOperation

from tests.conftest import Stack
from tests.webstack import serve_web

FUZZ_EXAMPLES = int(os.environ.get("IMAGEBUS_TEST_FUZZ_EXAMPLES", "12"))
# Operations that take a body get more: that is where the input is rich.
BODY_FACTOR = 5


# Bodies a generator seldom makes, sent to every operation that takes one.
HOSTILE_BODIES = [
    b"[]", b'"a fox"', b"1", b"null", b"true", b"[" * 5000 + b"]" * 5000, b"\xff\xfe",
    b'{"prompt": {"a": 1}}', b'{"prompt": ["a", 2]}', b'{"prompt": "a", "n": 1e308}',
    b'{"prompt": "a", "n": NaN}', b'{"prompt": "a", "seed": -1}', b'{"prompt": "a", "size": 64}',
    b'{"prompt": "a", "size": "99999x99999"}', b'{"prompt": "a", "response_format": ["url"]}',
    b'{"prompt": "a", "model": 5}', b'{"prompt": "a\\u0000"}', b'{"prompt": "\\ud800"}',
    b'{"prompt": "a", "requirements": []}', b'{"1": 2}', b'{"prompt": "a", "n": 10000000000}',
]  # fmt: skip


def hostile(url: str, paths: list[str], seen: dict[str, int]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for path in paths:
            for body in HOSTILE_BODIES:
                headers = {"Content-Type": "application/json"}
                response = http.post(path, content=body, headers=headers)
                seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
                assert response.status_code < 500 or response.status_code in (502, 504), (
                    path, body[:80], response.status_code, response.text,
                )  # fmt: skip


def fuzz(url: str) -> dict[str, int]:
    """Run in a thread (schemathesis calls with requests, synchronously) while the
    server runs in the test's event loop. Returns how many calls got each status."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: dict[str, int] = {}
    # The pool's event stream never ends and takes no input but the token (which
    # test_web_pool checks): a fuzzed call would wait forever.
    operations = [
        op for op in (r.ok() for r in schema.get_all_operations()) if op.path != "/v1/pool/events"
    ]
    hostile(url, [op.path for op in operations if op.body], seen)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(url, operation, mode, seen)
            except hypothesis.errors.Unsatisfiable:
                # Nothing to make invalid: an operation with no parameters and no body.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return seen


def fuzz_operation(
    url: str, operation: APIOperation, mode: GenerationMode, seen: dict[str, int]
) -> None:
    documented = set(operation.definition.raw["responses"])
    examples = FUZZ_EXAMPLES * (BODY_FACTOR if operation.body else 1)

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, timeout=30)
        seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
        assert response.status_code != 500, (case.as_curl_command(), response.text)
        assert str(response.status_code) in documented, (
            case.as_curl_command(),
            response.status_code,
            response.text,
        )

    check()


async def test_fuzz_the_openapi_document(stack: Stack) -> None:
    # No worker: valid jobs fail at once (the registry knows nobody serves them).
    await stack.start_orchestrator(
        registry_warm_s=0.0, queue_timeout_s=0.5, max_attempts=1, recruit_timeout_s=0.1
    )
    async with serve_web(stack.nats_url, rate_per_minute=0, wait_s=5.0) as web:
        seen = await asyncio.to_thread(fuzz, web.url)
    print("fuzz: calls by status", dict(sorted(seen.items())))
    assert sum(seen.values()) >= FUZZ_EXAMPLES

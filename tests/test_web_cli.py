"""`imagebus web` as a user runs it: refuses to bind beyond loopback without a token
(exit 2), says so when the bus is unreachable (exit 3), serves, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import httpx
import pytest

from imagebus.embedded import free_port
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


async def test_refuses_a_public_address_without_a_token() -> None:
    code, _, stderr = await run_cli("web", "--host", "0.0.0.0", "--port", str(free_port()))
    assert code == 2 and "IMAGEBUS_WEB_TOKEN" in stderr, stderr


async def test_says_when_the_bus_is_unreachable() -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    code, _, stderr = await run_cli("web", "--nats-url", nowhere, "--port", str(free_port()))
    assert code == 3 and "cannot reach NATS" in stderr, stderr


async def test_serves_and_stops_on_sigterm(nats_url: str) -> None:
    port = free_port()
    web = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "web", "--nats-url", nats_url, "--port", str(port),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                try:
                    response = await http.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert response.status_code == 200 and response.json()["ok"] is True
            docs = await http.get("/docs")
            assert docs.status_code == 200 and "POST /v1/jobs" in docs.text
            assert (await http.get("/openapi.json")).json()["openapi"].startswith("3.1")
    finally:
        web.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(web.wait(), 30)
    assert code == 0

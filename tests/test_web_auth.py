"""Tokens of the web role (401 without, 403 for admin actions without the admin
token), its refusal to bind beyond loopback without one, and the OpenAI-compatible
endpoint driven by the official `openai` package."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from imagebus.settings import ConfigError, WebSettings
from imagebus.web.app import create_app
from tests.conftest import Stack
from tests.webstack import TINY, read_events, serve_web

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_refuses_to_bind_beyond_loopback_without_a_token() -> None:
    with pytest.raises(ConfigError, match="IMAGEBUS_WEB_TOKEN"):
        create_app(WebSettings(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="IMAGEBUS_WEB_TOKEN"):
        WebSettings.from_env({"IMAGEBUS_WEB_HOST": "192.0.2.1"}).check()
    create_app(WebSettings(host="0.0.0.0", token="secret"))  # with one it starts
    create_app(WebSettings(host="localhost"))


async def test_tokens(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    tokens = {"token": "alice-token,bob-token", "admin_token": "admin-token"}
    async with (
        serve_web(stack.nats_url, **tokens) as web,
        serve_web(stack.nats_url, **tokens) as other,
    ):
        async with web.http() as anonymous, web.http("wrong") as wrong:
            for client in (anonymous, wrong):
                response = await client.post("/v1/jobs", json={"prompt": "a fox", **TINY})
                assert response.status_code == 401, response.text
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert (await client.get("/v1/workers")).status_code == 401
            assert (await anonymous.get("/healthz")).status_code == 200  # for load balancers

        async with web.http("alice-token") as alice, web.http("bob-token") as bob:
            async with web.http("admin-token") as admin:
                job = (await alice.post("/v1/jobs", json={"prompt": "a fox", **TINY})).json()
                assert (await bob.get(job["status_url"])).status_code == 200
                # EventSource and <img> cannot send headers: ?token= works too.
                events = await read_events(
                    anonymous_with_query(web.url), f"{job['events_url']}?token=bob-token"
                )
                assert events[-1][0] == "done"
                # Cancelling someone else's job is an admin action.
                response = await bob.delete(job["status_url"])
                assert response.status_code == 403, response.text
                assert response.json()["error"]["code"] == "forbidden"
                assert (await alice.delete(job["status_url"])).status_code in (200, 202)
                assert (await admin.delete(job["status_url"])).status_code in (200, 202)

        # A job this process did not submit: only an admin may cancel it.
        async with other.http("alice-token") as alice_elsewhere, other.http("admin-token") as admin:
            job = (await alice_elsewhere.post("/v1/jobs", json={"prompt": "an owl", **TINY})).json()
            async with web.http("alice-token") as alice:
                assert (await alice.delete(job["status_url"])).status_code == 403
            async with web.http("admin-token") as admin_here:
                response = await admin_here.delete(job["status_url"])
                assert response.status_code in (200, 202), response.text


def anonymous_with_query(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=60)


async def test_openai_package_as_the_client(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url, token="sk-imagebus") as web:
        client = openai.AsyncOpenAI(base_url=f"{web.url}/v1", api_key="sk-imagebus", max_retries=0)
        answer = await client.images.generate(
            model="dall-e-3", prompt="a lighthouse at dusk", n=2, size="64x64",
            response_format="b64_json", extra_body={"steps": 2},
        )  # fmt: skip
        assert len(answer.data) == 2
        for image in answer.data:
            assert image.b64_json and base64.b64decode(image.b64_json).startswith(PNG_MAGIC)

        answer = await client.images.generate(
            model="tiny", prompt="a lighthouse at dawn", size="64x64", response_format="url",
            extra_body={"steps": 2},
        )  # fmt: skip
        assert answer.data[0].url and answer.data[0].url.startswith(web.url)
        async with web.http("sk-imagebus") as http:
            image = await http.get(answer.data[0].url)
            assert image.status_code == 200 and image.content.startswith(PNG_MAGIC)

        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(prompt="a fox", size="65x64")
        assert bad.value.status_code == 400
        body = bad.value.body
        assert (
            isinstance(body, dict)
            and body["param"] == "size"
            and "multiple of 8" in body["message"]
        )
        with pytest.raises(openai.BadRequestError):
            await client.images.generate(prompt="a fox", size="big")
        with pytest.raises(openai.AuthenticationError):
            wrong = openai.AsyncOpenAI(base_url=f"{web.url}/v1", api_key="sk-wrong", max_retries=0)
            await wrong.images.generate(prompt="a fox", size="64x64")
        await client.close()


async def test_openai_package_sees_the_rate_limit(stack: Stack) -> None:
    await stack.start_orchestrator()
    await stack.start_worker()
    async with serve_web(stack.nats_url, rate_per_minute=1, rate_burst=1) as web:
        client = openai.AsyncOpenAI(base_url=f"{web.url}/v1", api_key="sk-any", max_retries=0)
        answer = await client.images.generate(prompt="a fox", size="64x64", extra_body={"steps": 1})
        assert len(answer.data) == 1
        with pytest.raises(openai.RateLimitError) as limited:
            await client.images.generate(prompt="a fox", size="64x64")
        assert limited.value.status_code == 429
        assert int(limited.value.response.headers["retry-after"]) >= 1
        body = limited.value.body
        assert isinstance(body, dict) and body["code"] == "rate_limited", body
        await client.close()

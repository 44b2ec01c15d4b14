"""The `imagebus` command, run as a user would run it."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from .conftest import Stack
from .helpers import SETTLE_S, eventually, run_cli


async def test_generate_writes_valid_pngs_of_the_requested_size(
    stack: Stack, tmp_path: Path
) -> None:
    await stack.start_orchestrator()
    workers = {(await stack.start_worker()).id for _ in range(2)}
    code, stdout, stderr = await run_cli(
        "generate", "a lighthouse at dusk", "-n", "3", "--width", "64", "--height", "48",
        "--steps", "3", "--seed", "7", "--out", str(tmp_path), "--nats-url", stack.nats_url,
        "--json",
    )  # fmt: skip
    assert code == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["seed"] for r in records] == [7, 8, 9]
    assert {r["worker_id"] for r in records} <= workers
    job_id = records[0]["job_id"]  # said on stderr as soon as it was accepted
    assert f"job {job_id} (imagebus job status|wait|fetch {job_id})" in stderr
    for record in records:
        path = Path(record["path"])
        assert path.parent == tmp_path
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            assert (image.format, image.size) == ("PNG", (64, 48))


async def test_generate_exit_codes(stack: Stack, tmp_path: Path) -> None:
    await stack.start_orchestrator(max_attempts=2)
    out = tmp_path / "out"
    url = ["--nats-url", stack.nats_url, "--out", str(out)]
    code, _, stderr = await run_cli("generate", "x", "--width", "65", *url)
    assert code == 2 and "width must be a multiple of 8" in stderr
    size = ["--width", "64", "--height", "64", "--queue-timeout", "1"]
    code, _, stderr = await run_cli("generate", "x", *size, *url)
    assert code == 1 and "no worker available" in stderr  # none joined within 1 s
    assert not out.exists()
    code, _, stderr = await run_cli("generate", "x", "--nats-url", "nats://127.0.0.1:1")
    assert code == 3 and "cannot reach NATS" in stderr
    code, _, stderr = await run_cli("generate", "x", "--inbox-prefix", "alice", *url)
    assert code == 2 and "an inbox prefix is _INBOX or _INBOX.<name>" in stderr


async def test_blacklist_commands_go_through_the_orchestrators(stack: Stack) -> None:
    bus = ["--nats-url", stack.nats_url]
    code, _, stderr = await run_cli("blacklist", "list", *bus)
    assert code == 3 and "no orchestrator" in stderr  # none running yet: nothing to ask
    await stack.start_orchestrator()
    code, stdout, _ = await run_cli("blacklist", "list", *bus)
    assert code == 0 and stdout.startswith("blacklisted-worker\t")
    code, stdout, _ = await run_cli("blacklist", "add", "rogue-7", "--reason", "bad images", *bus)
    assert code == 0 and "rogue-7 blacklisted" in stdout
    code, stdout, _ = await run_cli("blacklist", "list", *bus)
    assert "rogue-7\t" in stdout and "bad images" in stdout
    code, stdout, _ = await run_cli("blacklist", "remove", "rogue-7", *bus)
    assert code == 0
    code, _, stderr = await run_cli("blacklist", "remove", "rogue-7", *bus)
    assert code == 1 and "not blacklisted" in stderr
    code, _, stderr = await run_cli("blacklist", "add", *bus)
    assert code == 2 and "worker id is required" in stderr
    code, _, stderr = await run_cli("blacklist", "add", "not a valid id!", *bus)
    assert code == 2 and "Traceback" not in stderr


async def test_worker_with_unavailable_model_fails_with_a_clear_message(nats_url: str) -> None:
    code, _, stderr = await run_cli(
        "worker", "--model", "nota-ai/bk-sdm-tiny", "--nats-url", nats_url, timeout=180
    )
    assert code == 2
    assert "cannot load model 'nota-ai/bk-sdm-tiny'" in stderr
    assert "hf download nota-ai/bk-sdm-tiny" in stderr
    assert "Traceback" not in stderr


async def test_worker_refuses_an_id_already_in_use(stack: Stack) -> None:
    await stack.start_worker("taken-id")
    code, _, stderr = await run_cli(
        "worker", "--worker-id", "taken-id", "--nats-url", stack.nats_url
    )
    assert code == 2 and "already used by a running worker" in stderr


@pytest.mark.parametrize(
    ("command", "variable", "value", "words"),
    [
        ("orchestrator", "IMAGEBUS_MAX_ATTEMPTS", "ten", "must be an integer, got 'ten'"),
        ("orchestrator", "IMAGEBUS_DATABASE_URL", "", "a PostgreSQL URL is required"),
        ("worker", "IMAGEBUS_MAX_BATCH", "-1", "must be at least 0"),
        ("worker", "IMAGEBUS_CHANNELS_LAST", "yes", "must be 1 (on) or 0 (off)"),
        ("generate", "IMAGEBUS_NATS_INBOX_PREFIX", "alice", "an inbox prefix is _INBOX"),
        ("schema", "IMAGEBUS_MAX_WIDTH", "wide", "must be an integer"),
        ("presets", "IMAGEBUS_LOG_FORMAT", "xml", "must be one of console, json"),
    ],
)
async def test_a_bad_variable_is_a_usage_error_naming_it(
    command: str, variable: str, value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    if variable != "IMAGEBUS_DATABASE_URL":
        monkeypatch.setenv("IMAGEBUS_DATABASE_URL", "postgresql://127.0.0.1:1/none")
    else:
        monkeypatch.delenv(variable)
    args = ["x"] if command == "generate" else []
    code, _, stderr = await run_cli(command, *args)
    assert code == 2
    assert f"imagebus {command}: {variable}: {words}" in stderr
    assert "Traceback" not in stderr


async def test_help_for_every_command() -> None:
    commands = ["up", "orchestrator", "worker", "request", "generate", "workers", "stats", "job"]
    for command in [*commands, "schema", "presets", "blacklist"]:
        code, stdout, _ = await run_cli(command, "--help")
        assert code == 0 and stdout.startswith(f"usage: imagebus {command}")


async def test_worker_batching_options_are_checked(nats_url: str) -> None:
    code, stdout, _ = await run_cli("worker", "--help")
    assert code == 0 and "--max-batch" in stdout and "--batch-window-ms" in stdout
    code, _, stderr = await run_cli("worker", "--max-batch", "-1", "--nats-url", nats_url)
    assert code == 2 and "must not be negative" in stderr


async def test_stats_reports_each_orchestrator_and_its_event_loop_lag(stack: Stack) -> None:
    code, _, stderr = await run_cli("stats", "--nats-url", stack.nats_url)
    assert code == 3 and "no orchestrator answered" in stderr
    orchestrator = await stack.start_orchestrator()
    await asyncio.sleep(0.3)  # a few lag samples
    code, stdout, _ = await run_cli("stats", "--nats-url", stack.nats_url)
    assert code == 0
    (stats,) = [json.loads(line) for line in stdout.splitlines()]
    assert stats["orchestrator_id"] == orchestrator.id
    assert stats["jobs_running"] == 0
    assert stats["loop_lag"]["samples"] > 0
    assert 0 <= stats["loop_lag"]["p50_ms"] <= stats["loop_lag"]["max_ms"]


@pytest.mark.parametrize("command", ["generate", "request"])
async def test_ctrl_c_cancels_the_job(stack: Stack, tmp_path: Path, command: str) -> None:
    orchestrator = await stack.start_orchestrator()
    worker = await stack.start_worker()
    size = ["--width", "128", "--height", "128", "--steps", "150", "-n", "2", "--no-progress"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", command, *(size if command == "generate" else []),
        *(["interrupted"] if command == "generate" else []),
        "--nats-url", stack.nats_url, "--out", str(tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        # A suite started in the background (`make test &`) ignores SIGINT, and children
        # inherit that: give the CLI the SIGINT a terminal would deliver.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(b"interrupted\n128\n128\n150\n2\n")  # what `request` asks
    await process.stdin.drain()
    assert await eventually(lambda: worker.status().generating > 0, 60)  # an image is being made
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 30) == 130
    # The pool stops working on it: both images end as cancelled, and no image is saved.
    assert await orchestrator.settle(SETTLE_S)
    conn = await asyncpg.connect(stack.database_url)
    try:
        jobs = await conn.fetch("SELECT job_id, state FROM jobs")
        codes = await conn.fetch("SELECT error_code FROM tasks")
    finally:
        await conn.close()
    assert [job["state"] for job in jobs] == ["cancelled"]
    assert [row["error_code"] for row in codes] == ["cancelled"] * 2
    assert not list(tmp_path.glob("*.png"))

"""`imagebus up` end to end: real servers, real worker processes, Ctrl-C cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from imagebus.embedded import free_port

pytestmark = pytest.mark.slow


def _wait_for_line(process: subprocess.Popen[str], word: str, timeout: float) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if line.startswith(word):
            return lines
    raise AssertionError(f"`imagebus up` never printed {word!r}: {''.join(lines)}")


def test_up_serves_generate_with_three_workers_and_stops_cleanly(tmp_path: Path) -> None:
    nats_port, monitor_port, web_port = free_port(), free_port(), free_port()
    env = {**os.environ, "IMAGEBUS_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "imagebus", "up", "--workers", "3", "--model", "tiny",
         "--nats-port", str(nats_port), "--monitor-port", str(monitor_port),
         "--web-port", str(web_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        ready = _wait_for_line(up, "ready", timeout=240)[-1]
        web_url = f"http://127.0.0.1:{web_port}"
        assert web_url in ready, ready  # the ready line says where the web page is
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6  # nats-server, postgres, orchestrator, 3 workers, web
        assert httpx.get(f"{web_url}/healthz").status_code == 200

        out = tmp_path / "generated"
        generate = subprocess.run(
            [sys.executable, "-m", "imagebus", "generate", "a lighthouse at dusk", "-n", "4",
             "--width", "64", "--height", "64", "--out", str(out), "--json",
             "--nats-url", f"nats://127.0.0.1:{nats_port}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert generate.returncode == 0, generate.stderr
        records = [json.loads(line) for line in generate.stdout.splitlines()]
        assert len(records) == 4
        for record in records:
            with Image.open(record["path"]) as image:
                assert (image.format, image.size) == ("PNG", (64, 64))
        # Four images, three single-slot workers: the work is shared by all three.
        assert len({r["worker_id"] for r in records}) == 3
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0
    time.sleep(0.5)
    assert [c.pid for c in children if c.is_running() and c.status() != "zombie"] == []

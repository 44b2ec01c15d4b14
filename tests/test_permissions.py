"""The per-role NATS permissions of deploy/nats-permissions.conf, on a real nats-server:
every role does all its work within them, and what a role must not do is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from imagebus.db import Database
from imagebus.embedded import NatsServer, free_port
from imagebus.orchestrator import Orchestrator
from imagebus.protocol import AdoptionAnswer, AdoptionCall, control, decode, encode
from imagebus.protocol import subjects as s
from imagebus.requester import ImageBusClient, ImageBusError
from imagebus.settings import BusSettings, OrchestratorSettings, WorkerSettings
from imagebus.worker import Worker
from imagebus.worker.engine import DiffusionEngine

from .helpers import SETTLE_S, eventually, run_cli

CONFIG = Path(__file__).parents[1] / "deploy" / "nats-permissions.conf"
PASSWORDS = {
    "orchestrator": ("IMAGEBUS_ORCHESTRATOR_PASSWORD", "orchestrator-secret"),
    "gpu-1": ("IMAGEBUS_WORKER_GPU_1_PASSWORD", "worker-secret"),
    "alice": ("IMAGEBUS_REQUESTER_ALICE_PASSWORD", "requester-secret"),
    "admin": ("IMAGEBUS_ADMIN_PASSWORD", "admin-secret"),
}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    for variable, password in PASSWORDS.values():
        monkeypatch.setenv(variable, password)  # the config reads them from its environment
    running = NatsServer("127.0.0.1", free_port(), tmp_path / "nats", config_file=CONFIG).start()
    yield running
    running.stop()


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user][1]}@{server.host}:{server.port}"


def violations(server: NatsServer) -> list[str]:
    log = server.store_dir / "nats-server.log"
    # nats-server logs "Publish Violation" or "Subscription Violation", with the subject.
    return [line for line in log.read_text().splitlines() if "Violation" in line]


async def test_every_role_works_within_its_permissions(
    server: NatsServer, database_url: str, tiny_engine: DiffusionEngine, tmp_path: Path
) -> None:
    orchestrator = Orchestrator(
        OrchestratorSettings(database_url, bus=BusSettings(url(server, "orchestrator"), None))
    )
    worker = Worker(
        WorkerSettings("gpu-1", bus=BusSettings(url(server, "gpu-1"), None, "_INBOX.gpu-1")),
        engine=tiny_engine,
    )
    await orchestrator.start()
    await worker.start()
    try:
        async with ImageBusClient(url(server, "alice"), inbox_prefix="_INBOX.alice") as client:
            # Two images on one slot, each long enough for heartbeats: the second waits
            # for the slot the first frees (capacity notices).
            job = await client.submit(["a", "b"], width=128, height=128, steps=40)
            images = await job.wait(60)
            assert [image.worker_id for image in images] == ["gpu-1", "gpu-1"]
            job_id = await job.accepted()
            kept = await client.fetch(job_id)
            assert sorted(kept) == [0, 1]
            assert [w.advert.worker_id for w in await client.workers()] == ["gpu-1"]
            assert len(await client.orchestrator_stats()) == 1
            assert "properties" in await client.schema()
            # An adoption call reaches the worker, whose answer comes back (it runs none).
            assert orchestrator.nc is not None
            call = AdoptionCall(job_id, orchestrator.id)
            answer = await orchestrator.nc.request(s.WORKER_ADOPT_SUBJECT, encode(call), 5)
            assert decode(AdoptionAnswer, answer.data) == AdoptionAnswer("gpu-1", [])
            # A cancellation goes out (of a job already done: nothing to stop).
            await job.cancel()
            assert await orchestrator.settle(SETTLE_S)
            assert (await client.job_status(job_id)).state == "done"
        code, _, stderr = await run_cli(
            "generate", "from the command line", "--width", "64", "--height", "64",
            "--steps", "2", "--inbox-prefix", "_INBOX.alice", "--nats-url", url(server, "alice"),
            "--out", str(tmp_path / "out"),
        )  # fmt: skip
        assert code == 0, stderr
    finally:
        await worker.stop(grace_s=5)
        await orchestrator.stop(grace_s=5)
    # Everything above was allowed: the server refused nothing.
    assert violations(server) == []


async def _refused(nc: Client, errors: list[str], action: str) -> bool:
    """Whether the server answers `action` (already sent) with a permissions violation
    (nats-py hands it to the error callback in lower case; the connection stays up)."""
    await nc.flush()
    expected = f"permissions violation for {action}".lower()
    return await eventually(lambda: any(expected in e.lower() for e in errors), 5.0)


async def _connect(server: NatsServer, user: str, errors: list[str]) -> Client:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        url(server, user), inbox_prefix=f"_INBOX.{user}", error_cb=on_error, allow_reconnect=False
    )


async def test_what_a_role_must_not_do_is_refused(server: NatsServer) -> None:
    alice_errors: list[str] = []
    worker_errors: list[str] = []
    alice = await _connect(server, "alice", alice_errors)
    worker = await _connect(server, "gpu-1", worker_errors)
    try:
        # A requester reads no one else's inbox, no worker's assignments, no request.
        await alice.subscribe("_INBOX.>")
        assert await _refused(alice, alice_errors, 'Subscription to "_INBOX.>"')
        await alice.subscribe(s.worker_assign_subject("gpu-1"))
        assert await _refused(alice, alice_errors, 'Subscription to "imagebus.worker.gpu-1.assign"')
        await alice.publish(s.INTAKE_PULL_SUBJECT, b'{"batch": 1}', reply="_INBOX.alice.x")
        assert await _refused(alice, alice_errors, f'Publish to "{s.INTAKE_PULL_SUBJECT}"')
        # Nor does it administer: only admins (and orchestrators) may.
        await alice.publish(s.ADMIN_BLACKLIST_SUBJECT, b"", reply="_INBOX.alice.x")
        assert await _refused(alice, alice_errors, f'Publish to "{s.ADMIN_BLACKLIST_SUBJECT}"')
        # Nor may it (or a worker) take over another's tasks with an adoption call.
        await alice.publish(s.WORKER_ADOPT_SUBJECT, b"", reply="_INBOX.alice.x")
        assert await _refused(alice, alice_errors, f'Publish to "{s.WORKER_ADOPT_SUBJECT}"')
        # A worker takes no other worker's assignments and reads no requester's inbox.
        others = s.worker_assign_subject("gpu-2")
        await worker.subscribe(others)
        assert await _refused(worker, worker_errors, f'Subscription to "{others}"')
        await worker.subscribe("_INBOX.alice.>")
        assert await _refused(worker, worker_errors, 'Subscription to "_INBOX.alice.>"')
        await worker.subscribe(s.REQUEST_SUBJECT)
        assert await _refused(worker, worker_errors, f'Subscription to "{s.REQUEST_SUBJECT}"')
        await worker.publish(s.INTAKE_PULL_SUBJECT, b'{"batch": 1}', reply="_INBOX.gpu-1.x")
        assert await _refused(worker, worker_errors, f'Publish to "{s.INTAKE_PULL_SUBJECT}"')
        await worker.publish(s.ADMIN_BLACKLIST_SUBJECT, b"", reply="_INBOX.gpu-1.x")
        assert await _refused(worker, worker_errors, f'Publish to "{s.ADMIN_BLACKLIST_SUBJECT}"')
        await worker.publish(s.WORKER_ADOPT_SUBJECT, b"", reply="_INBOX.gpu-1.x")
        assert await _refused(worker, worker_errors, f'Publish to "{s.WORKER_ADOPT_SUBJECT}"')
        # It holds its own worker id, and cannot take, free or read another's.
        other_key = s.worker_id_key_subject("gpu-2")
        await worker.publish(other_key, b"x", reply="_INBOX.gpu-1.x")
        assert await _refused(worker, worker_errors, f'Publish to "{other_key}"')
        other_read = f"$JS.API.DIRECT.GET.KV_{s.WORKER_IDS_BUCKET}.{other_key}"
        await worker.publish(other_read, b"", reply="_INBOX.gpu-1.x")
        assert await _refused(worker, worker_errors, f'Publish to "{other_read}"')
    finally:
        await alice.close()
        await worker.close()
    # Nobody gets in without a user.
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)


async def test_a_requester_outside_its_inbox_prefix_gets_a_clear_error(
    server: NatsServer, database_url: str
) -> None:
    orchestrator = Orchestrator(
        OrchestratorSettings(database_url, bus=BusSettings(url(server, "orchestrator"), None))
    )
    await orchestrator.start()
    try:
        # Without --inbox-prefix its replies would come on _INBOX.<random>, which this
        # user may not receive: the stream's confirmation never reaches it.
        async with ImageBusClient(url(server, "alice")) as client:
            with pytest.raises(ImageBusError, match="inbox-prefix"):
                await client.submit("lost?", width=64, height=64, steps=2)
    finally:
        await orchestrator.stop(grace_s=5)


async def test_an_admin_manages_the_blacklist_over_the_bus(
    server: NatsServer, database_url: str
) -> None:
    orchestrator = Orchestrator(
        OrchestratorSettings(database_url, bus=BusSettings(url(server, "orchestrator"), None))
    )
    await orchestrator.start()
    try:
        async with ImageBusClient(url(server, "admin"), inbox_prefix="_INBOX.admin") as admin:
            assert [e.worker_id for e in await admin.blacklist()] == ["blacklisted-worker"]
            assert await admin.blacklist_add("rogue-7", "bad images") is True
            # In force at once on the orchestrator that was asked.
            assert orchestrator.blacklist is not None and "rogue-7" in orchestrator.blacklist
            assert await admin.blacklist_add("rogue-7", "very bad images") is False  # again
            (rogue,) = [e for e in await admin.blacklist() if e.worker_id == "rogue-7"]
            assert rogue.reason == "very bad images" and rogue.added_at.startswith("20")
            assert await admin.blacklist_remove("rogue-7") is True
            assert await admin.blacklist_remove("rogue-7") is False  # not blacklisted now
            assert await admin.blacklist_remove("never-seen") is False
            assert [e.worker_id for e in await admin.blacklist()] == ["blacklisted-worker"]
            # Bad input is refused with a reason, and changes nothing.
            with pytest.raises(ImageBusError, match="not a worker id") as bad_id:
                await admin.blacklist_add("no spaces allowed")
            assert bad_id.value.code == "invalid_request"
            with pytest.raises(ImageBusError, match="longer than") as long_reason:
                await admin.blacklist_add("rogue-8", "x" * 5000)
            assert long_reason.value.code == "invalid_request"
            assert admin.nc is not None
            for payload in [encode(control.BlacklistCommand("purge")), b"\xc1not msgpack"]:
                reply = await admin.nc.request(s.ADMIN_BLACKLIST_SUBJECT, payload, timeout=5)
                answer = control.read_answer(control.BlacklistAnswer, reply.data, reply.headers)
                assert isinstance(answer, control.ControlError), payload
                assert answer.code == "invalid_request"
            assert [e.worker_id for e in await admin.blacklist()] == ["blacklisted-worker"]
            # An admin may ask what a requester asks, too.
            assert len(await admin.orchestrator_stats()) == 1
        # A requester may not: the server refuses its request, so nobody answers.
        async with ImageBusClient(url(server, "alice"), inbox_prefix="_INBOX.alice") as alice:
            with pytest.raises(ImageBusError, match="no orchestrator answered"):
                await alice.blacklist_add("rogue-9")
    finally:
        await orchestrator.stop(grace_s=5)
    assert not await _blacklisted_in_db(database_url, "rogue-9")
    assert [v for v in violations(server) if "imagebus.admin" not in v] == []
    assert len(violations(server)) == 1  # alice's attempt, and only that


async def _blacklisted_in_db(database_url: str, worker_id: str) -> bool:
    db = await Database.connect(database_url)
    try:
        return worker_id in await db.blacklisted_ids()
    finally:
        await db.close()

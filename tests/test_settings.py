"""Settings read from the environment: defaults, rules, overrides, and the file names."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from imagebus.protocol import Limits
from imagebus.requester import GeneratedImage
from imagebus.requester.files import image_filename, save_images
from imagebus.settings import (
    BusSettings,
    ConfigError,
    Environment,
    LogSettings,
    OrchestratorSettings,
    WorkerSettings,
    limits_from_env,
)

DB = {"IMAGEBUS_DATABASE_URL": "postgresql://db/imagebus"}


def _id(device: str) -> str:
    return f"derived-{device}"


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    assert BusSettings.from_env({}) == BusSettings()
    assert limits_from_env({}) == Limits()
    assert LogSettings.from_env({}) == LogSettings("info", "console")
    orchestrator = OrchestratorSettings.from_env(DB)
    assert orchestrator.database_url == "postgresql://db/imagebus"
    assert (orchestrator.max_attempts, orchestrator.intake_ack_wait_s) == (10, 10.0)
    worker = WorkerSettings.from_env({}, default_id=_id)
    assert (worker.worker_id, worker.model, worker.device) == ("derived-cpu", "tiny", "cpu")
    assert (worker.slots, worker.max_batch, worker.channels_last) == (1, 1, False)


def test_every_role_reads_its_variables() -> None:
    env = {
        **DB,
        "IMAGEBUS_NATS_URL": "nats://bus:4222",
        "IMAGEBUS_NATS_CREDS": "/run/user.creds",
        "IMAGEBUS_NATS_INBOX_PREFIX": "_INBOX.alice",
        "IMAGEBUS_MAX_ATTEMPTS": "4",
        "IMAGEBUS_INTAKE_ACK_WAIT": "2",
        "IMAGEBUS_MAX_WIDTH": "1024",
        "IMAGEBUS_WORKER_ID": "gpu-1",
        "IMAGEBUS_MODEL": "tiny,noop",
        "IMAGEBUS_DEVICE": "cuda:1",
        "IMAGEBUS_WORKER_SLOTS": "12",
        "IMAGEBUS_COMPILE": "1",
        "IMAGEBUS_TORCH_THREADS": "3",
        "IMAGEBUS_LOG_FORMAT": "json",
    }
    bus = BusSettings("nats://bus:4222", "/run/user.creds", "_INBOX.alice")
    orchestrator = OrchestratorSettings.from_env(env)
    assert orchestrator.bus == bus
    assert (orchestrator.max_attempts, orchestrator.intake_ack_wait_s) == (4, 2.0)
    assert orchestrator.limits.max_width == 1024
    worker = WorkerSettings.from_env(env, default_id=_id)
    assert (worker.worker_id, worker.model_names, worker.device) == (
        "gpu-1",
        ["tiny", "noop"],
        "cuda:1",
    )
    assert (worker.slots, worker.max_batch, worker.compile_unet) == (12, 8, True)
    assert (worker.torch_threads, worker.bus) == (3, bus)
    assert LogSettings.from_env(env).format == "json"


def test_max_batch_follows_the_device_and_slots_follow_max_batch() -> None:
    assert WorkerSettings.from_env({"IMAGEBUS_DEVICE": "cuda"}, default_id=_id).slots == 8
    assert WorkerSettings.from_env({"IMAGEBUS_MAX_BATCH": "3"}, default_id=_id).slots == 3
    # 0 means "by device", from a flag as from the environment.
    worker = WorkerSettings.from_env({"IMAGEBUS_MAX_BATCH": "5"}, default_id=_id, max_batch=0)
    assert (worker.max_batch, worker.slots) == (1, 1)


def test_overrides_win_and_none_does_not_override() -> None:
    env = {**DB, "IMAGEBUS_NATS_URL": "nats://env:4222", "IMAGEBUS_MAX_ATTEMPTS": "4"}
    bus = BusSettings.from_env(env, nats_url="nats://flag:4222", creds_file=None)
    assert bus.nats_url == "nats://flag:4222"
    orchestrator = OrchestratorSettings.from_env(env, max_attempts=None, database_url="pg://x")
    assert (orchestrator.max_attempts, orchestrator.database_url) == (4, "pg://x")
    assert OrchestratorSettings.from_env(env, max_attempts=2).max_attempts == 2
    worker = WorkerSettings.from_env({"IMAGEBUS_WORKER_ID": "env"}, worker_id="flag", slots=4)
    assert (worker.worker_id, worker.slots) == ("flag", 4)
    with pytest.raises(TypeError, match="no setting 'colour'"):
        BusSettings.from_env({}, colour="red")


def test_plain_construction_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEBUS_NATS_URL", "nats://elsewhere:4222")
    monkeypatch.setenv("IMAGEBUS_MAX_ATTEMPTS", "4")
    assert BusSettings().nats_url == "nats://127.0.0.1:4222"
    assert OrchestratorSettings("pg://x").max_attempts == 10
    assert BusSettings.from_env().nats_url == "nats://elsewhere:4222"  # os.environ by default


@pytest.mark.parametrize(
    ("variable", "value", "rule"),
    [
        ("IMAGEBUS_MAX_ATTEMPTS", "ten", "must be an integer"),
        ("IMAGEBUS_MAX_ATTEMPTS", "0", "must be at least 1"),
        ("IMAGEBUS_RECRUIT_TIMEOUT", "soon", "must be a number"),
        ("IMAGEBUS_HEARTBEAT_TIMEOUT", "-1", "must be at least 0"),
        ("IMAGEBUS_MAX_REQUEST_BYTES", "0", "must be at least 1"),
        ("IMAGEBUS_MAX_GUIDANCE", "lots", "must be a number"),
        ("IMAGEBUS_NATS_INBOX_PREFIX", "alice", "an inbox prefix is _INBOX or _INBOX.<name>"),
    ],
)
def test_a_bad_orchestrator_variable_is_named_with_its_rule(
    variable: str, value: str, rule: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}: {rule}.*got '{value}'") as raised:
        OrchestratorSettings.from_env({**DB, variable: value})
    assert raised.value.name == variable


def test_the_orchestrator_requires_a_database_url() -> None:
    with pytest.raises(ConfigError, match="IMAGEBUS_DATABASE_URL: a PostgreSQL URL is required"):
        OrchestratorSettings.from_env({})


@pytest.mark.parametrize(
    ("variable", "value", "rule"),
    [
        ("IMAGEBUS_MAX_BATCH", "-1", "must be at least 0"),
        ("IMAGEBUS_WORKER_SLOTS", "many", "must be an integer"),
        ("IMAGEBUS_BATCH_WINDOW_MS", "-5", "must be at least 0"),
        ("IMAGEBUS_TORCH_THREADS", "1.5", "must be an integer"),
        ("IMAGEBUS_CHANNELS_LAST", "yes", "must be 1 \\(on\\) or 0 \\(off\\)"),
        ("IMAGEBUS_COMPILE", "true", "must be 1 \\(on\\) or 0 \\(off\\)"),
    ],
)
def test_a_bad_worker_variable_is_named_with_its_rule(variable: str, value: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}: {rule}, got '{value}'"):
        WorkerSettings.from_env({variable: value}, default_id=_id)


def test_a_worker_needs_an_id_or_a_way_to_derive_one() -> None:
    with pytest.raises(ConfigError, match="IMAGEBUS_WORKER_ID"):
        WorkerSettings.from_env({})
    assert WorkerSettings.from_env({"IMAGEBUS_DEVICE": "cuda:0"}, default_id=_id).worker_id == (
        "derived-cuda:0"
    )


def test_a_bad_log_format_is_named() -> None:
    with pytest.raises(ConfigError, match="IMAGEBUS_LOG_FORMAT: must be one of console, json"):
        LogSettings.from_env({"IMAGEBUS_LOG_FORMAT": "xml"})


def test_an_empty_variable_counts_as_unset() -> None:
    env = Environment({"IMAGEBUS_MAX_ATTEMPTS": "", "IMAGEBUS_COMPILE": "0"})
    assert env.integer("IMAGEBUS_MAX_ATTEMPTS", 10) == 10
    assert env.flag("IMAGEBUS_COMPILE") is False


def test_saved_and_fetched_images_share_one_file_name(tmp_path: Path) -> None:
    image = GeneratedImage("job1", 2, 77, b"\x89PNG-2", 8, 8, "w", 0.1)
    assert image.save(tmp_path / "saved") == tmp_path / "saved" / "job1-2.png"
    assert (tmp_path / "saved" / "job1-2.png").read_bytes() == b"\x89PNG-2"
    paths = save_images("job1", {0: b"a", 2: b"\x89PNG-2"}, tmp_path / "fetched")
    assert [p.name for p in paths] == [image_filename("job1", 0), "job1-2.png"]
    assert paths[1].read_bytes() == b"\x89PNG-2"
    (archive_path,) = save_images("job1", {0: b"a", 2: b"c"}, tmp_path, as_zip=True)
    assert archive_path == tmp_path / "job1.zip"
    with zipfile.ZipFile(archive_path) as archive:
        assert archive.namelist() == ["job1-0.png", "job1-2.png"]

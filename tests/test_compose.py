"""Static checks of docker-compose.yml and the Dockerfile against the CLI and settings.

No Docker engine runs here, so these read the files: every service built from
this repo runs a real `imagebus` subcommand with flags it accepts, every
IMAGEBUS_* variable it sets is one the code reads, and the pieces fit together.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebus.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
# ${VAR:-default} and ${VAR-default}; a bare ${VAR} has no default and is left in place.
INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("imagebus parser has no subcommands")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    text = (ROOT / "docker-compose.yml").read_text()
    resolved = INTERPOLATION.sub(lambda m: m.group(1), text)
    assert "${" not in resolved, "an interpolation without a default"
    return yaml.safe_load(resolved)


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """The Dockerfile's instructions, one per item, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def instruction(lines: list[str], name: str) -> str:
    found = [line.split(None, 1)[1] for line in lines if line.split()[0].upper() == name]
    assert found, f"Dockerfile has no {name}"
    return found[-1]


def dockerfile_env(lines: list[str]) -> dict[str, str]:
    pairs = [p for line in lines if line.split()[0] == "ENV" for p in shlex.split(line)[1:]]
    return dict(pair.split("=", 1) for pair in pairs)


def built_here(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("build") == "."}


def test_services_present(compose: dict[str, Any]) -> None:
    expected = {"nats", "postgres", "orchestrator", "worker", "requester"}
    assert expected <= set(compose["services"])
    assert {"orchestrator", "worker", "requester"} <= set(built_here(compose))


def test_nats_enables_jetstream_and_monitoring(compose: dict[str, Any]) -> None:
    command = compose["services"]["nats"]["command"]
    words = shlex.split(command) if isinstance(command, str) else command
    assert "-js" in words
    assert "-m" in words


def test_commands_are_real_subcommands_with_known_flags(
    compose: dict[str, Any], dockerfile: list[str]
) -> None:
    parsers = subcommands()
    commands = {name: s["command"] for name, s in built_here(compose).items()}
    commands["Dockerfile CMD"] = json.loads(instruction(dockerfile, "CMD"))
    for name, command in commands.items():
        words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
        assert words and words[0] in parsers, f"{name}: {words[:1]} is not a subcommand"
        known = {opt for a in parsers[words[0]]._actions for opt in a.option_strings}
        flags = [w.split("=", 1)[0] for w in words[1:] if w.startswith("--")]
        assert set(flags) <= known, f"{name}: unknown flags {set(flags) - known}"
        assert build_parser().parse_args(words).command == words[0]


def test_imagebus_variables_are_read_by_the_code(compose: dict[str, Any]) -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "imagebus").rglob("*.py"))
    names = {
        var.split("=", 1)[0]  # environment may be a mapping or a list of NAME=value
        for service in compose["services"].values()
        for var in (service.get("environment") or {})
        if var.startswith("IMAGEBUS_")
    }
    assert "IMAGEBUS_NATS_URL" in names
    unread = {n for n in names if not re.search(rf"[\"']{n}[\"']", source)}
    assert not unread, f"set in compose but read nowhere in imagebus/: {unread}"


def test_worker_mounts_the_hf_cache(compose: dict[str, Any], dockerfile: list[str]) -> None:
    hf_home = dockerfile_env(dockerfile)["HF_HOME"]
    worker = compose["services"]["worker"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in worker["volumes"]}
    assert hf_home in mounts
    assert mounts[hf_home] in compose["volumes"], "the HF cache should be a named volume"
    assert isinstance(worker["deploy"]["replicas"], int)


def test_orchestrator_waits_for_nats_and_postgres(compose: dict[str, Any]) -> None:
    assert {"nats", "postgres"} <= set(compose["services"]["orchestrator"]["depends_on"])


def test_dockerfile_entrypoint_is_imagebus(dockerfile: list[str]) -> None:
    assert json.loads(instruction(dockerfile, "ENTRYPOINT")) == ["imagebus"]
    assert dockerfile_env(dockerfile)["IMAGEBUS_LOG_FORMAT"] in {"console", "json"}

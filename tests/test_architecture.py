"""The import rules of docs/architecture.md, checked on the source (no import runs).

Each part of imagebus may import only the parts listed for it below: no import runs
back up, there are no cycles, the protocol knows no role, workers and requesters never
reach PostgreSQL, and only the worker loads torch and diffusers. A new part (a web
role, say) is added here with what it may use, which is the point of the table.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import imagebus

PACKAGE = Path(imagebus.__file__).parent

# part -> the other parts of imagebus it may import
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "logs": set(),
    # Stopping tasks and waiting on events without Python 3.11's lost cancellations.
    "tasks": set(),
    "looplag": {"tasks"},
    # Prometheus metrics from the figures on the bus: for /metrics and --metrics-port.
    "metrics": {"protocol", "settings"},
    # The one reader of the environment (typed getters, ConfigError): knows nothing else.
    "environment": set(),
    "settings": {"environment", "protocol"},
    "connections": {"logs", "settings"},
    "embedded": {"settings"},
    "db": {"logs", "protocol", "tasks"},
    # A job's kept images in the results stream: read by the orchestrator and the client.
    "kept": {"protocol"},
    # Comparing a re-run image with the original (issue 13): pure, knows no role.
    "verification": set(),
    "orchestrator": {
        "connections",
        "db",
        "kept",
        "logs",
        "looplag",
        "protocol",
        "settings",
        "tasks",
        "verification",
        "metrics",
    },
    "worker": {"connections", "logs", "looplag", "protocol", "settings", "metrics", "tasks"},
    "requester": {"connections", "kept", "logs", "protocol", "settings", "tasks"},
    # The web role speaks only NATS, through the requester's Python client.
    "web": {"connections", "logs", "protocol", "requester", "settings", "metrics", "tasks"},
    "supervisor": set(),  # child processes and their restart policy: knows no role
    "launcher": {
        "connections",
        "embedded",
        "logs",
        "protocol",
        "requester",
        "settings",
        "supervisor",
        "web",
        "worker",
    },
    # The CLI is the top: thin over every role's Python API.
    "cli": {
        "",
        "connections",
        "db",
        "embedded",
        "launcher",
        "logs",
        "orchestrator",
        "protocol",
        "requester",
        "settings",
        "supervisor",
        "web",
        "worker",
    },
    "": {"requester"},  # imagebus/__init__.py re-exports the client
    "__main__": {"cli"},
}
# third-party packages only one part may import
OWNED_BY = {
    "asyncpg": "db",
    "torch": "worker",
    "diffusers": "worker",
    "transformers": "worker",
    "accelerate": "worker",
}


def _modules() -> Iterator[tuple[str, str, ast.Module]]:
    """(part, dotted package of the module, parsed source) for every module."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = relative.parts
        part = "" if parts == ("__init__",) else parts[0]
        package = ".".join(("imagebus", *parts[:-1]))
        yield part, package, ast.parse(path.read_text(), str(path))


def _imports(package: str, tree: ast.Module) -> Iterator[str]:
    """Absolute names of everything a module imports, wherever in it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module or ""
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            yield ".".join([*base, node.module] if node.module else base)


def _part_of(name: str) -> str:
    rest = name.split(".")[1:]
    return rest[0] if rest else ""


def test_every_part_imports_only_what_it_may() -> None:
    breaches = []
    for part, package, tree in _modules():
        assert part in ALLOWED, f"imagebus/{part} is a new part: add it to ALLOWED"
        for name in _imports(package, tree):
            top = name.split(".")[0]
            if top == "imagebus":
                target = _part_of(name)
                if target != part and target not in ALLOWED[part]:
                    breaches.append(f"{package} imports {name}")
            elif top in OWNED_BY and OWNED_BY[top] != part:
                breaches.append(f"{package} imports {top}, which only {OWNED_BY[top]}/ may")
    assert not breaches, "\n".join(breaches)


def test_the_allowed_imports_have_no_cycle() -> None:
    """The table itself is layered: following it never comes back to where it began."""

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in ALLOWED.get(start, set()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [part for part in ALLOWED if reaches(part, part, {part})]
    assert not cycles, f"parts on a cycle: {cycles}"


def test_the_checker_sees_a_breach(tmp_path: Path) -> None:
    """The rule above can fail: a relative import from the protocol up into a role."""
    tree = ast.parse("from ..worker import Worker\nimport asyncpg\n")
    names = list(_imports("imagebus.protocol", tree))
    assert names == ["imagebus.worker", "asyncpg"]
    assert _part_of(names[0]) not in ALLOWED["protocol"]

"""What each role may publish and receive on a NATS server: one source for
deploy/nats-permissions.conf and for the entries `imagebus keys new` prints, built
from the subjects themselves (subjects.py), so the two cannot drift apart.

A worker may publish its own messages only under its own id (adverts, capacity
notices, heartbeats, reports), and answer only what it was sent (`allow_responses`:
its refusals of assignments, its answers to recruitment calls). A requester or an
admin receives on its own inboxes only. The orchestrators, trusted like the
database, may do anything. docs/security.md says what this stops and what not.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import subjects as s

ROLES = ("worker", "orchestrator", "requester", "admin")


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer (once) the requests it receives


def _inboxes(name: str) -> str:
    """The inboxes of user `name`: it sets `--inbox-prefix _INBOX.<name>`."""
    return f"{s.DEFAULT_INBOX_PREFIX}.{name}.>"


def _everything_under(subject: str) -> str:
    return f"{subject}.>"


def orchestrator_permissions() -> Permissions:
    return Permissions(publish=(">",), subscribe=(">",))


def worker_permissions(worker_id: str) -> Permissions:
    kv_stream = f"KV_{s.WORKER_IDS_BUCKET}"
    own_key = s.worker_id_key_subject(worker_id)
    return Permissions(
        publish=(
            _everything_under(s.DEFAULT_INBOX_PREFIX),  # images and events to requesters
            s.report_subject("*", worker_id),
            s.heartbeat_subject("*", worker_id),
            s.worker_advert_subject(worker_id),
            s.capacity_subject(worker_id),
            s.RESULTS_SUBJECTS,  # the copies kept for `imagebus job fetch`
            s.worker_ping_subject(worker_id),  # is another worker running with its id?
            own_key,
            f"$JS.API.DIRECT.GET.{kv_stream}.{own_key}",
            f"$JS.API.STREAM.INFO.{kv_stream}",
            f"$JS.API.STREAM.CREATE.{kv_stream}",
        ),
        subscribe=(
            _inboxes(worker_id),
            _everything_under(s.worker_prefix(worker_id)),  # assignments, cancels...
            s.RECRUIT_SUBJECT,
            s.WORKER_ADOPT_SUBJECT,  # an orchestrator taking over a dead one's job
        ),
        allow_responses=True,
    )


def requester_permissions(name: str) -> Permissions:
    results = s.RESULTS_STREAM
    return Permissions(
        publish=(
            s.REQUEST_SUBJECT,
            s.CANCEL_SUBJECT,
            _everything_under(s.ORCHESTRATORS_PREFIX),
            s.SCHEMA_SUBJECT,
            f"$JS.API.CONSUMER.CREATE.{results}",
            f"$JS.API.CONSUMER.CREATE.{results}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{results}.>",
            f"$JS.API.CONSUMER.DELETE.{results}.>",
        ),
        subscribe=(_inboxes(name),),
        allow_responses=True,
    )


def admin_permissions(name: str) -> Permissions:
    return Permissions(
        publish=(
            _everything_under(s.ADMIN_PREFIX),
            _everything_under(s.ORCHESTRATORS_PREFIX),
            s.SCHEMA_SUBJECT,
        ),
        subscribe=(_inboxes(name),),
    )


def permissions_of(role: str, name: str) -> Permissions:
    """The permissions of `role` for the user `name` (a worker's id, a requester's or
    an admin's inbox name; an orchestrator's is not used)."""
    if role == "worker":
        return worker_permissions(name)
    if role == "orchestrator":
        return orchestrator_permissions()
    if role == "requester":
        return requester_permissions(name)
    if role == "admin":
        return admin_permissions(name)
    raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


# --- nats-server configuration ------------------------------------------------------


def _allow_list(subjects: tuple[str, ...], indent: str) -> str:
    """A list on one line if short, else one subject a line."""
    quoted = [f'"{subject}"' for subject in subjects]
    one_line = ", ".join(quoted)
    if len(one_line) <= 64:
        return f"{{allow: [{one_line}]}}"
    lines = f",\n{indent}  ".join(quoted)
    return f"{{allow: [\n{indent}  {lines}\n{indent}]}}"


def render_permissions(permissions: Permissions, indent: str = "") -> str:
    """`permissions` as a nats-server configuration map."""
    inner = indent + "  "
    lines = [
        "{",
        f"{inner}publish: {_allow_list(permissions.publish, inner)}",
        f"{inner}subscribe: {_allow_list(permissions.subscribe, inner)}",
    ]
    if permissions.allow_responses:
        lines.append(f"{inner}allow_responses: true")
    lines.append(indent + "}")
    return "\n".join(lines)


def nkey_entry(public_key: str, role: str, name: str) -> str:
    """A `users` entry binding the nkey `public_key` to `role`'s permissions as `name`."""
    permissions = render_permissions(permissions_of(role, name), "  ")
    return f'# {role} {name}\n{{\n  nkey: "{public_key}"\n  permissions: {permissions}\n}}'


@dataclass(frozen=True)
class PasswordUser:
    """A user of the shipped file: its password comes from nats-server's environment."""

    role: str
    name: str
    password_variable: str
    comment: str


# The users of deploy/nats-permissions.conf; docs/deployment.md and the compose file
# set their passwords' variables.
SHIPPED_USERS = (
    PasswordUser(
        "orchestrator",
        "orchestrator",
        "IMAGEBUS_ORCHESTRATOR_PASSWORD",
        "The orchestrators run beside PostgreSQL, manage the streams and talk to every\n"
        "role: trusted, like the database.",
    ),
    PasswordUser(
        "worker",
        "gpu-1",
        "IMAGEBUS_WORKER_GPU_1_PASSWORD",
        "One user per worker, bound to its worker id (here gpu-1: start it with\n"
        "`--worker-id gpu-1 --inbox-prefix _INBOX.gpu-1`). It receives only its own\n"
        "assignments, reads no inbox but its own and cannot touch the request stream.\n"
        "Its adverts, freed slots, heartbeats and reports name its id in their subject:\n"
        "it may publish those for gpu-1 only. It publishes results and events to\n"
        "requesters' inboxes and the copies kept for `imagebus job fetch`; it answers\n"
        "what it is asked (allow_responses: its refusals of assignments). Its stops come\n"
        "on its own subject, from its orchestrator (imagebus.worker.gpu-1.cancel). It holds its\n"
        "own worker id in the IMAGEBUS_WORKER_IDS key-value bucket (writes and reads its\n"
        "own key only; it may create the bucket if no worker has yet).",
    ),
    PasswordUser(
        "admin",
        "admin",
        "IMAGEBUS_ADMIN_PASSWORD",
        "The operators (`imagebus blacklist` over the bus). Only they and the\n"
        "orchestrators may publish on imagebus.admin.>; they may also ask what a\n"
        "requester asks (status, workers, stats, schema), and receive on their inboxes\n"
        "(`--inbox-prefix _INBOX.admin`).",
    ),
    PasswordUser(
        "requester",
        "alice",
        "IMAGEBUS_REQUESTER_ALICE_PASSWORD",
        "One user per requester (here alice: `--inbox-prefix _INBOX.alice`). It sends\n"
        "requests and cancellations, asks orchestrators (status, workers, stats, schema),\n"
        "reads kept results by job id (`imagebus job fetch`: drop the four $JS.API lines\n"
        "to forbid it) and receives only on its own inboxes. It may not administer\n"
        "(imagebus.admin.>).",
    ),
)

_HEADER = """\
# Generated by `imagebus keys permissions` from imagebus/protocol/permissions.py:
# edit that, not this (tests/test_keys.py checks that the two agree).
#
# nats-server with one user per imagebus role, each allowed only what its role needs
# (see docs/security.md). Start it with JetStream and a store directory:
#
#   nats-server -js -sd /var/lib/nats -c deploy/nats-permissions.conf
#
# Passwords are read from nats-server's environment and never written here. In
# production prefer nkeys (`imagebus keys new ROLE ID` prints the entry to add to
# `users`), bcrypt hashes (`nats server passwd`) or JWT accounts; the permissions
# stay the same.
"""


def render_config(users: tuple[PasswordUser, ...] = SHIPPED_USERS, extra: str = "") -> str:
    """A nats-server configuration with `users` (and `extra` entries, such as the ones
    `imagebus keys new` prints) in its authorization block."""
    entries = []
    for user in users:
        comment = "\n".join(f"    # {line}" for line in user.comment.splitlines())
        permissions = render_permissions(permissions_of(user.role, user.name), "    ")
        entries.append(
            f"{comment}\n    {{user: {user.name}, password: ${user.password_variable}, "
            f"permissions: {permissions}}}"
        )
    if extra:
        entries.append("\n".join(f"    {line}" for line in extra.splitlines()))
    body = "\n\n".join(entries)
    return f"{_HEADER}\nauthorization {{\n  users = [\n{body}\n  ]\n}}\n"

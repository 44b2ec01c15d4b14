"""`imagebus keys`: nkeys for each role, and the server's permissions file.

`keys new ROLE ID` writes a new nkey seed (readable by its owner only) and prints the
nats-server `users` entry that binds its public key to the role's permissions (a
worker's to its own id). `keys permissions` prints deploy/nats-permissions.conf as
protocol/permissions.py describes it (`--check FILE` says whether FILE is current).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..protocol import nkeyfiles, permissions
from ..protocol import subjects as s
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, add_command, say


def register(commands: Commands) -> None:
    keys = add_command(
        commands, "keys", _no_action, help="make nkeys for each role; the permissions file"
    )
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new", help="write a new nkey seed file and print its nats-server users entry"
    )
    new.set_defaults(handler=cmd_new)
    new.add_argument("role", choices=permissions.ROLES)
    new.add_argument(
        "id",
        help="the worker's id, or the requester's or admin's name (its inboxes are "
        "_INBOX.<id>: give it --inbox-prefix _INBOX.<id>)",
    )
    new.add_argument("--out", default=None, help="the seed file (default ROLE-ID.nk)")
    new.add_argument("--force", action="store_true", help="replace an existing seed file")
    rendered = actions.add_parser(
        "permissions", help="print the nats-server permissions file for the shipped users"
    )
    rendered.set_defaults(handler=cmd_permissions)
    rendered.add_argument(
        "--check", metavar="FILE", default=None, help="exit 1 unless FILE is what it prints"
    )


def _no_action(args: argparse.Namespace) -> int:  # argparse requires an action
    return EXIT_USAGE


def cmd_new(args: argparse.Namespace) -> int:
    if not s.is_valid_worker_id(args.id):
        say("keys", f"an id is 1-64 letters, digits, '-' or '_', got {args.id!r}")
        return EXIT_USAGE
    out = Path(args.out or f"{args.role}-{args.id}.nk")
    seed = nkeyfiles.new_user_seed()
    try:
        nkeyfiles.write_seed_file(out, seed, force=args.force)
    except nkeyfiles.KeyFileError as exc:
        say("keys", str(exc))
        return EXIT_USAGE
    public = nkeyfiles.public_key(seed)
    say(
        "keys",
        f"wrote {args.role} {args.id}'s seed to {out} (keep it secret; give it with "
        f"--nats-nkey). Add this entry to the users of your nats-server configuration:",
    )
    print(permissions.nkey_entry(public, args.role, args.id))
    return EXIT_OK


def cmd_permissions(args: argparse.Namespace) -> int:
    rendered = permissions.render_config()
    if args.check is None:
        print(rendered, end="")
        return EXIT_OK
    try:
        current = Path(args.check).read_text()
    except OSError as exc:
        say("keys", f"{args.check}: cannot read it ({exc.strerror})")
        return EXIT_USAGE
    if current != rendered:
        say("keys", f"{args.check} is out of date: imagebus keys permissions > {args.check}")
        return EXIT_FAILED
    return EXIT_OK

"""Commands that look at or manage a running imagebus: `workers`, `stats`, `job`,
`schema`, `presets`, `blacklist`, `trust`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Commands,
    add_bus_options,
    add_command,
    client_from,
    say,
)

if TYPE_CHECKING:
    from ..protocol import JobStatus, WorkerListing


def register(commands: Commands) -> None:
    add_workers(commands)
    add_stats(commands)
    add_job(commands)
    add_schema(commands)
    add_command(commands, "presets", cmd_presets, help="list the named request templates")
    add_blacklist(commands)
    add_trust(commands)


def add_workers(commands: Commands) -> None:
    workers = add_command(commands, "workers", cmd_workers, help="list the live workers")
    add_bus_options(workers)
    workers.add_argument("--json", action="store_true", help="one JSON object per worker")


def add_stats(commands: Commands) -> None:
    stats = add_command(
        commands,
        "stats",
        cmd_stats,
        help="each orchestrator's figures: jobs, waiting tasks, event-loop lag (JSON)",
    )
    add_bus_options(stats)


def add_job(commands: Commands) -> None:
    job = add_command(
        commands, "job", cmd_job, help="a job's status, collect its images later, or cancel it"
    )
    add_bus_options(job)
    job.add_argument("action", choices=["status", "wait", "fetch", "cancel"])
    job.add_argument("job_id")
    job.add_argument("--out", type=Path, default=Path("generated"), help="fetch: where to save")
    job.add_argument("--zip", action="store_true", help="fetch: one zip of every image")
    job.add_argument(
        "--timeout", type=float, default=None, help="wait, cancel: give up after seconds"
    )
    job.add_argument("--json", action="store_true", help="status/wait/cancel: print JSON")
    job.add_argument(
        "--token", default=None, help="cancel: the job's cancel token, from its owner's Job"
    )
    job.add_argument(
        "--admin",
        action="store_true",
        help="cancel: as an admin (a user that may publish on imagebus.admin.>)",
    )


def add_schema(commands: Commands) -> None:
    schema = add_command(
        commands, "schema", cmd_schema, help="print the request parameters' JSON Schema"
    )
    schema.add_argument(
        "--from-bus", action="store_true", help="ask a running orchestrator (its limits)"
    )
    add_bus_options(schema)


def add_blacklist(commands: Commands) -> None:
    bl = add_command(
        commands,
        "blacklist",
        cmd_blacklist,
        help="manage the worker blacklist (through the orchestrators, over the bus)",
    )
    add_bus_options(bl)
    bl.add_argument("action", choices=["add", "remove", "list"])
    bl.add_argument("worker_id", nargs="?")
    bl.add_argument("--reason", default="", help="why (with add)")


def add_trust(commands: Commands) -> None:
    trust = add_command(
        commands,
        "trust",
        cmd_trust,
        help="trust a worker id as a verifier, or put it back on probation (over the bus)",
    )
    add_bus_options(trust)
    trust.add_argument("action", choices=["add", "remove", "list"])
    trust.add_argument("worker_id", nargs="?")


def cmd_workers(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with client_from(args) as client:
            listing = await client.workers()
        print_workers(listing, as_json=args.json)
        return EXIT_OK

    return asyncio.run(run())


def print_workers(listing: list[WorkerListing], *, as_json: bool) -> None:
    if as_json:
        for item in listing:
            print(json.dumps({**dataclasses.asdict(item.advert),
                              "last_seen_s": item.last_seen_s,
                              "gone": item.gone,
                              "blacklisted": item.blacklisted,
                              "breaker": item.breaker,
                              "breaker_open_s": item.breaker_open_s,
                              "breaker_failures": item.breaker_failures,
                              "trust": item.trust,
                              "verified": item.verified,
                              "strikes": item.strikes}))  # fmt: skip
        return
    print(f"{'WORKER':32} {'MODELS':22} {'DEVICE':14} {'SLOTS':5} {'STATE':9} "
          f"{'DONE':>5} {'FAILED':>6} {'S/IMAGE':>7} {'SEEN':>6} {'TRUST':9} {'VERIFIED':>8} "
          f"{'STRIKES':>7}")  # fmt: skip
    for item in listing:
        a = item.advert
        device = a.device if not a.gpu_name else f"{a.device} {a.vram_gb:g}GB"
        state = "BLACKLISTED" if item.blacklisted else a.state
        if not item.blacklisted and item.breaker == "open":
            state = f"rest {item.breaker_open_s:.0f}s"  # its breaker is open: no work
        elif not item.blacklisted and item.breaker == "half-open":
            state = "probing"
        if item.gone:
            state = "gone"  # not heard from lately: listed a while longer
        print(
            f"{a.worker_id:32} {','.join(a.models)[:22]:22} {device[:14]:14} "
            f"{a.free_slots}/{a.slots:<3} {state:9} {a.tasks_done:>5} {a.failures:>6} "
            f"{a.seconds_per_image:>7.2f} {item.last_seen_s:>5.1f}s {item.trust or '-':9} "
            f"{item.verified:>8} {item.strikes:>7}"
        )
    if not listing:
        print("(no worker has advertised itself to the orchestrator yet)")


def cmd_stats(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with client_from(args) as client:
            answers = await client.orchestrator_stats()
        for answer in answers:
            print(json.dumps(dataclasses.asdict(answer)))
        if not answers:
            say("stats", "no orchestrator answered")
            return EXIT_UNAVAILABLE
        return EXIT_OK

    return asyncio.run(run())


def cmd_job(args: argparse.Namespace) -> int:
    from ..protocol import FINAL_JOB_STATES
    from ..requester import ImageBusError
    from ..requester.files import save_images

    async def run() -> int:
        async with client_from(args) as client:
            try:
                if args.action == "fetch":
                    images = await client.fetch(args.job_id)
                    for path in save_images(args.job_id, images, args.out, as_zip=args.zip):
                        print(path)
                    return EXIT_OK
                if args.action == "wait":
                    status = await client.wait_job(args.job_id, args.timeout)
                elif args.action == "cancel":
                    status = await client.cancel_job(
                        args.job_id, args.timeout or 60.0, token=args.token, admin=args.admin
                    )
                else:
                    status = await client.job_status(args.job_id)
            except ImageBusError as exc:
                say(f"job {args.action}", str(exc))
                return EXIT_USAGE if exc.code == "not_found" else EXIT_FAILED
        print_job_status(status, as_json=args.json)
        if args.action == "wait":
            return EXIT_OK if status.state == "done" else EXIT_FAILED
        if args.action == "cancel":
            return EXIT_OK  # it has ended, cancelled or (if it was done already) not
        return EXIT_OK if status.state in FINAL_JOB_STATES or status.failed == 0 else EXIT_FAILED

    return asyncio.run(run())


def print_job_status(status: JobStatus, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(dataclasses.asdict(status)))
        return
    print(f"job {status.job_id}: {status.state}, {status.succeeded} of {status.n} "
          f"images done, {status.failed} failed; created {status.created_at}")  # fmt: skip
    for t in status.tasks:
        progress = f" step {t.step}/{t.steps}" if t.state == "running" and t.step else ""
        took = f" in {t.seconds:.2f}s" if t.seconds else ""
        line = f"  image {t.index}: {t.state}{progress} seed {t.seed}"
        line += f" on {t.worker_id or '-'}{took}, {t.attempts} attempt(s)"
        if t.phase:
            line += f" - {t.phase}: {t.reason}"
        print(line + (f" - {t.error}" if t.error else ""))


def cmd_schema(args: argparse.Namespace) -> int:
    from ..protocol import request_schema
    from ..settings import limits_from_env

    if args.from_bus:

        async def fetch() -> dict[str, Any]:
            async with client_from(args) as client:
                return await client.schema()

        document = asyncio.run(fetch())
    else:
        document = request_schema(limits_from_env())
    print(json.dumps(document, indent=2))
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    from ..protocol import PRESETS

    for name, preset in PRESETS.items():
        fields = ", ".join(f"{k}={v}" for k, v in preset.items() if k != "description")
        print(f"{name:10} {preset['description']}\n{'':10} {fields}")
    return EXIT_OK


def cmd_blacklist(args: argparse.Namespace) -> int:
    """Through the orchestrators over the bus: an operator needs no database credentials
    (the permissions file lets only the admin user and orchestrators use this subject)."""
    from ..requester import ImageBusError

    if args.action != "list" and not args.worker_id:
        print(f"imagebus blacklist {args.action}: a worker id is required", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        async with client_from(args) as client:
            if args.action == "add":
                new = await client.blacklist_add(args.worker_id, args.reason)
                print(f"{args.worker_id} {'blacklisted' if new else 'was already blacklisted'}")
            elif args.action == "remove":
                if not await client.blacklist_remove(args.worker_id):
                    print(f"{args.worker_id} is not blacklisted", file=sys.stderr)
                    return EXIT_FAILED
                print(f"{args.worker_id} removed from the blacklist")
            else:
                for entry in await client.blacklist():
                    print(f"{entry.worker_id}\t{entry.added_at}\t{entry.reason}")
        return EXIT_OK

    try:
        return asyncio.run(run())
    except ImageBusError as exc:
        say("blacklist", str(exc))
        return EXIT_USAGE if exc.code == "invalid_request" else EXIT_UNAVAILABLE


def cmd_trust(args: argparse.Namespace) -> int:
    from ..requester import ImageBusError

    if args.action != "list" and not args.worker_id:
        print(f"imagebus trust {args.action}: a worker id is required", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        async with client_from(args) as client:
            answer = await client.trust(args.action, args.worker_id or "")
        if args.action == "list":
            for e in answer.entries:
                declared = " (declared)" if e.declared else ""
                print(f"{e.worker_id}\t{e.level}{declared}\tverified {e.verified}"
                      f"\tstrikes {e.strikes}")  # fmt: skip
        else:
            done = "trusted" if args.action == "add" else "on probation"
            print(f"{args.worker_id} {done}" + ("" if answer.changed else " (already)"))
        return EXIT_OK

    try:
        return asyncio.run(run())
    except ImageBusError as exc:
        say("trust", str(exc))
        return EXIT_USAGE if exc.code == "invalid_request" else EXIT_UNAVAILABLE

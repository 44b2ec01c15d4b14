"""The `imagebus` command: a thin layer over the Python API.

Exit codes: 0 success; 1 some work failed (e.g. an image did not arrive);
2 bad usage or a rejected request; 3 a server (NATS, PostgreSQL) unreachable;
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .connections import BusUnavailable
from .logs import configure_logging
from .protocol import DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH
from .protocol import subjects as s
from .settings import (
    INBOX_PREFIX_RULE,
    BusSettings,
    OrchestratorSettings,
    WorkerSettings,
    env_float,
    env_int,
    env_str,
)

if TYPE_CHECKING:
    from .requester import ImageBusClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagebus", description="A distributed text-to-image pool over NATS."
    )
    parser.add_argument("--version", action="version", version=f"imagebus {__version__}")
    parser.add_argument(
        "--log-level", default=env_str("IMAGEBUS_LOG_LEVEL", "info"), help="debug, info, warning"
    )
    parser.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=env_str("IMAGEBUS_LOG_FORMAT", "console"),
        help="console (key=value) or json lines",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def nats_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--nats-url",
            default=None,
            help="NATS server URL (env IMAGEBUS_NATS_URL, default nats://127.0.0.1:4222)",
        )
        p.add_argument(
            "--nats-creds", default=None, help="NATS .creds file (env IMAGEBUS_NATS_CREDS)"
        )
        p.add_argument(
            "--inbox-prefix",
            type=inbox_prefix,
            default=None,
            help="where replies come, _INBOX.<user> on a server with per-user permissions "
            "(env IMAGEBUS_NATS_INBOX_PREFIX, default _INBOX)",
        )

    def database_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--database-url",
            default=os.environ.get("IMAGEBUS_DATABASE_URL"),
            help="PostgreSQL URL (env IMAGEBUS_DATABASE_URL)",
        )

    up = commands.add_parser("up", help="run NATS, PostgreSQL, an orchestrator and workers here")
    up.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    up.add_argument("--model", default="tiny", help="model for every worker (default tiny)")
    up.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    up.add_argument("--nats-port", type=int, default=4222, help="default 4222; reused if running")
    up.add_argument("--monitor-port", type=int, default=8222, help="NATS monitoring (default 8222)")
    up.add_argument(
        "--database-url", default=None, help="use this PostgreSQL instead of an embedded one"
    )
    up.add_argument(
        "--interactive", action="store_true", help="open the requester prompt; exit stops all"
    )
    up.add_argument("--out", type=Path, default=Path("generated"), help="where --interactive saves")

    orch = commands.add_parser("orchestrator", help="run an orchestrator")
    nats_option(orch)
    database_option(orch)
    orch.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="recruitment asks per round (env IMAGEBUS_MAX_ATTEMPTS, default 10)",
    )

    worker = commands.add_parser("worker", help="run a diffusion worker")
    nats_option(worker)
    worker.add_argument(
        "--worker_id",
        "--worker-id",
        dest="worker_id",
        default=os.environ.get("IMAGEBUS_WORKER_ID"),
        help="this worker's id (env IMAGEBUS_WORKER_ID; default derived from machine and device)",
    )
    worker.add_argument(
        "--model",
        default=env_str("IMAGEBUS_MODEL", "tiny"),
        help="tiny, a Hugging Face model id or a local directory; several, comma-separated,"
        " to hold several models (env IMAGEBUS_MODEL)",
    )
    worker.add_argument(
        "--device", default=env_str("IMAGEBUS_DEVICE", "cpu"), help="cpu, cuda or cuda:N"
    )
    worker.add_argument(
        "--slots",
        type=int,
        default=env_int("IMAGEBUS_WORKER_SLOTS", 0),
        help="jobs taken at once (default: --max-batch; env IMAGEBUS_WORKER_SLOTS)",
    )
    worker.add_argument(
        "--max-batch",
        type=int,
        default=env_int("IMAGEBUS_MAX_BATCH", 0),
        help="dynamic batching: at most this many compatible images per pipeline call"
        " (default 1 on cpu, 8 on cuda; env IMAGEBUS_MAX_BATCH)",
    )
    worker.add_argument(
        "--batch-window-ms",
        type=float,
        default=env_float("IMAGEBUS_BATCH_WINDOW_MS", 5.0),
        help="how long a batch that is not full waits for more images (default 5 ms)",
    )
    worker.add_argument(
        "--channels-last",
        action="store_true",
        default=env_str("IMAGEBUS_CHANNELS_LAST", "") == "1",
        help="store convolution weights NHWC (faster on most GPUs; env IMAGEBUS_CHANNELS_LAST=1)",
    )
    worker.add_argument(
        "--compile",
        action="store_true",
        default=env_str("IMAGEBUS_COMPILE", "") == "1",
        help="torch.compile the UNet: faster steps after a slow first call at each size"
        " (env IMAGEBUS_COMPILE=1)",
    )
    worker.add_argument(
        "--threads",
        type=int,
        default=env_int("IMAGEBUS_TORCH_THREADS", 0),
        help="torch CPU threads; 0 = all cores (env IMAGEBUS_TORCH_THREADS)",
    )
    worker.add_argument(
        "--noop-seconds",
        type=float,
        default=0.0,
        help="benchmarks only: with --model noop, each job sleeps this long",
    )

    request = commands.add_parser("request", help="interactive requester prompt")
    nats_option(request)
    request.add_argument("--out", type=Path, default=Path("generated"), help="default ./generated")

    gen = commands.add_parser("generate", help="generate images from a prompt, for scripts")
    nats_option(gen)
    gen.add_argument("prompt")
    gen.add_argument(
        "-n", "--num-images", dest="n", type=int, default=None, help="replicas (default 1)"
    )
    gen.add_argument("--width", type=int, default=None, help=f"default {DEFAULT_WIDTH}")
    gen.add_argument("--height", type=int, default=None, help=f"default {DEFAULT_HEIGHT}")
    gen.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_STEPS}")
    gen.add_argument("--guidance", type=float, default=None, help=f"default {DEFAULT_GUIDANCE}")
    gen.add_argument("--seed", type=int, default=None, help="first image's seed; next ones +1")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--model", default=None, help="only workers holding this model take it")
    gen.add_argument(
        "--preset", default=None, help="a named template (see `imagebus presets`); flags override"
    )
    gen.add_argument(
        "--require-device", choices=["cpu", "cuda"], default=None, help="only this kind of worker"
    )
    gen.add_argument("--min-vram-gb", type=float, default=None, help="only GPUs with this much")
    gen.add_argument("--task-timeout", type=float, default=None, help="seconds per image")
    gen.add_argument("--job-timeout", type=float, default=None, help="seconds for the whole job")
    gen.add_argument(
        "--queue-timeout", type=float, default=None, help="seconds an image may wait for a worker"
    )
    gen.add_argument("--out", type=Path, default=Path("generated"), help="default ./generated")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object per image instead of its path"
    )

    workers = commands.add_parser("workers", help="list the live workers")
    nats_option(workers)
    workers.add_argument("--json", action="store_true", help="one JSON object per worker")

    stats = commands.add_parser(
        "stats", help="each orchestrator's figures: jobs, waiting tasks, event-loop lag (JSON)"
    )
    nats_option(stats)

    job = commands.add_parser("job", help="a job's status, collect its images later, or cancel it")
    nats_option(job)
    job.add_argument("action", choices=["status", "wait", "fetch", "cancel"])
    job.add_argument("job_id")
    job.add_argument("--out", type=Path, default=Path("generated"), help="fetch: where to save")
    job.add_argument("--zip", action="store_true", help="fetch: one zip of every image")
    job.add_argument(
        "--timeout", type=float, default=None, help="wait, cancel: give up after seconds"
    )
    job.add_argument("--json", action="store_true", help="status/wait/cancel: print JSON")

    schema = commands.add_parser("schema", help="print the request parameters' JSON Schema")
    schema.add_argument(
        "--from-bus", action="store_true", help="ask a running orchestrator (its limits)"
    )
    nats_option(schema)

    commands.add_parser("presets", help="list the named request templates")

    bl = commands.add_parser("blacklist", help="manage the worker blacklist")
    database_option(bl)
    bl.add_argument("action", choices=["add", "remove", "list"])
    bl.add_argument("worker_id", nargs="?")
    bl.add_argument("--reason", default="", help="why (with add)")
    return parser


def inbox_prefix(value: str) -> str:
    if not s.is_valid_inbox_prefix(value):
        raise argparse.ArgumentTypeError(f"{INBOX_PREFIX_RULE}, got {value!r}")
    return value


def client_from(args: argparse.Namespace) -> ImageBusClient:
    from .requester import ImageBusClient  # loaded by the commands that use it, as elsewhere

    bus = bus_from(args)
    return ImageBusClient(bus.nats_url, creds_file=bus.creds_file, inbox_prefix=bus.inbox_prefix)


def bus_from(args: argparse.Namespace) -> BusSettings:
    base = BusSettings()
    return BusSettings(
        args.nats_url or base.nats_url,
        args.nats_creds or base.creds_file,
        args.inbox_prefix or base.inbox_prefix,
    )


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Run a service until SIGINT or SIGTERM, then stop it gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    await stopping.wait()
    await stop()


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from .orchestrator import Orchestrator

    if not args.database_url:
        print(
            "imagebus orchestrator: --database-url or IMAGEBUS_DATABASE_URL is required",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = OrchestratorSettings(database_url=args.database_url, bus=bus_from(args))
    if args.max_attempts is not None:
        if args.max_attempts < 1:
            print("imagebus orchestrator: --max-attempts must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        settings = OrchestratorSettings(**{**settings.__dict__, "max_attempts": args.max_attempts})
    orchestrator = Orchestrator(settings)
    try:
        asyncio.run(serve_until_signalled(orchestrator.start, orchestrator.stop))
    except OSError as exc:
        print(f"imagebus orchestrator: cannot reach PostgreSQL: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker, WorkerIdInUse, default_worker_id
    from .worker.engine import ModelLoadError

    if args.slots < 0 or args.max_batch < 0 or args.threads < 0 or args.batch_window_ms < 0:
        print(
            "imagebus worker: --slots, --max-batch, --threads and --batch-window-ms"
            " must not be negative",
            file=sys.stderr,
        )
        return EXIT_USAGE
    max_batch = args.max_batch or (8 if args.device.startswith("cuda") else 1)
    settings = WorkerSettings(
        worker_id=args.worker_id or default_worker_id(args.device),
        model=args.model,
        device=args.device,
        bus=bus_from(args),
        slots=args.slots or max_batch,
        max_batch=max_batch,
        batch_window_ms=args.batch_window_ms,
        channels_last=args.channels_last,
        compile_unet=args.compile,
        torch_threads=args.threads,
        noop_seconds=args.noop_seconds,
    )
    try:
        worker = Worker(settings)
        if args.model != "noop":
            print(f"loading model {args.model!r} on {args.device}...", file=sys.stderr)
        asyncio.run(serve_until_signalled(worker.start, worker.stop))
    except (ValueError, ModelLoadError, WorkerIdInUse) as exc:
        print(f"imagebus worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from .requester import ImageBusError
    from .requester.session import generate_and_save

    async def run() -> int:
        async with client_from(args) as client:
            try:
                outcome = await generate_and_save(
                    client,
                    args.prompt,
                    args.out,
                    n=args.n,
                    steps=args.steps,
                    timeout=args.timeout,
                    show_progress=False if args.no_progress else None,
                    on_job_id=lambda job_id: print(
                        f"job {job_id} (imagebus job status|wait|fetch {job_id})",
                        file=sys.stderr,
                    ),
                    width=args.width,
                    height=args.height,
                    guidance=args.guidance,
                    seed=args.seed,
                    negative_prompt=args.negative_prompt,
                    model=args.model,
                    preset=args.preset,
                    device=args.require_device,
                    min_vram_gb=args.min_vram_gb,
                    task_timeout=args.task_timeout,
                    job_timeout=args.job_timeout,
                    queue_timeout=args.queue_timeout,
                )
            except ImageBusError as exc:
                print(f"imagebus generate: {exc}", file=sys.stderr)
                return EXIT_USAGE if exc.code == "invalid_request" else EXIT_FAILED
        for image, path in zip(outcome.images, outcome.saved, strict=True):
            if args.json:
                record = {
                    "path": str(path),
                    "job_id": image.job_id,
                    "index": image.index,
                    "seed": image.seed,
                    "worker_id": image.worker_id,
                    "width": image.width,
                    "height": image.height,
                    "seconds": round(image.seconds, 4),
                }
                print(json.dumps(record))
            else:
                print(path)
        for failure in outcome.failures:
            print(f"imagebus generate: {failure}", file=sys.stderr)
        return EXIT_OK if outcome.ok else EXIT_FAILED

    return asyncio.run(run())


def cmd_request(args: argparse.Namespace) -> int:
    from .requester.interactive import interactive_requester

    async def run() -> int:
        async with client_from(args) as client:
            return await interactive_requester(client, args.out)

    return asyncio.run(run())


def cmd_blacklist(args: argparse.Namespace) -> int:
    from .db import Database

    if not args.database_url:
        print(
            "imagebus blacklist: --database-url or IMAGEBUS_DATABASE_URL is required",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.action != "list" and not args.worker_id:
        print(f"imagebus blacklist {args.action}: a worker id is required", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        db = await Database.connect(args.database_url)
        try:
            await db.migrate()
            if args.action == "add":
                new = await db.add_to_blacklist(args.worker_id, args.reason)
                print(f"{args.worker_id} {'blacklisted' if new else 'was already blacklisted'}")
            elif args.action == "remove":
                if not await db.remove_from_blacklist(args.worker_id):
                    print(f"{args.worker_id} is not blacklisted", file=sys.stderr)
                    return EXIT_FAILED
                print(f"{args.worker_id} removed from the blacklist")
            else:
                for entry in await db.blacklist():
                    added = entry.added_at.isoformat(timespec="seconds")
                    print(f"{entry.worker_id}\t{added}\t{entry.reason}")
            return EXIT_OK
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except OSError as exc:
        print(f"imagebus blacklist: cannot reach PostgreSQL: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def cmd_up(args: argparse.Namespace) -> int:
    from .embedded import EmbeddedError
    from .launcher import UpOptions, run_up

    if args.workers < 0:
        print("imagebus up: --workers must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    options = UpOptions(
        workers=args.workers,
        model=args.model,
        device=args.device,
        nats_port=args.nats_port,
        monitor_port=args.monitor_port,
        database_url=args.database_url,
        interactive=args.interactive,
        out_dir=args.out,
    )
    try:
        return run_up(options)
    except EmbeddedError as exc:
        print(f"imagebus up: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def cmd_workers(args: argparse.Namespace) -> int:

    async def run() -> int:
        async with client_from(args) as client:
            listing = await client.workers()
        if args.json:
            for item in listing:
                print(json.dumps({**dataclasses.asdict(item.advert),
                                  "last_seen_s": item.last_seen_s,
                                  "blacklisted": item.blacklisted}))  # fmt: skip
            return EXIT_OK
        print(f"{'WORKER':32} {'MODELS':22} {'DEVICE':14} {'SLOTS':5} {'STATE':9} "
              f"{'DONE':>5} {'FAILED':>6} {'S/IMAGE':>7} {'SEEN':>6}")  # fmt: skip
        for item in listing:
            a = item.advert
            device = a.device if not a.gpu_name else f"{a.device} {a.vram_gb:g}GB"
            state = "BLACKLISTED" if item.blacklisted else a.state
            print(
                f"{a.worker_id:32} {','.join(a.models)[:22]:22} {device[:14]:14} "
                f"{a.free_slots}/{a.slots:<3} {state:9} {a.tasks_done:>5} {a.failures:>6} "
                f"{a.seconds_per_image:>7.2f} {item.last_seen_s:>5.1f}s"
            )
        if not listing:
            print("(no worker has advertised itself to the orchestrator yet)")
        return EXIT_OK

    return asyncio.run(run())


def cmd_stats(args: argparse.Namespace) -> int:

    async def run() -> int:
        async with client_from(args) as client:
            answers = await client.orchestrator_stats()
        for answer in answers:
            print(json.dumps(answer))
        if not answers:
            print("imagebus stats: no orchestrator answered", file=sys.stderr)
            return EXIT_UNAVAILABLE
        return EXIT_OK

    return asyncio.run(run())


def cmd_job(args: argparse.Namespace) -> int:
    from .requester.client import FINAL_STATES, ImageBusError

    async def run() -> int:
        async with client_from(args) as client:
            try:
                if args.action == "fetch":
                    images = await client.fetch(args.job_id)
                    for path in save_images(args.job_id, images, args.out, args.zip):
                        print(path)
                    return EXIT_OK
                if args.action == "wait":
                    status = await client.wait_job(args.job_id, args.timeout)
                elif args.action == "cancel":
                    status = await client.cancel_job(args.job_id, args.timeout or 60.0)
                else:
                    status = await client.job_status(args.job_id)
            except ImageBusError as exc:
                print(f"imagebus job {args.action}: {exc}", file=sys.stderr)
                return EXIT_USAGE if exc.code == "not_found" else EXIT_FAILED
        if args.json:
            print(json.dumps(dataclasses.asdict(status)))
        else:
            print(f"job {status.job_id}: {status.state}, {status.succeeded} of {status.n} "
                  f"images done, {status.failed} failed; created {status.created_at}")  # fmt: skip
            for t in status.tasks:
                progress = f" step {t.step}/{t.steps}" if t.state == "running" and t.step else ""
                took = f" in {t.seconds:.2f}s" if t.seconds else ""
                line = f"  image {t.index}: {t.state}{progress} seed {t.seed}"
                line += f" on {t.worker_id or '-'}{took}, {t.attempts} attempt(s)"
                print(line + (f" - {t.error}" if t.error else ""))
        if args.action == "wait":
            return EXIT_OK if status.state == "done" else EXIT_FAILED
        if args.action == "cancel":
            return EXIT_OK  # it has ended, cancelled or (if it was done already) not
        return EXIT_OK if status.state in FINAL_STATES or status.failed == 0 else EXIT_FAILED

    return asyncio.run(run())


def save_images(job_id: str, images: dict[int, bytes], out: Path, as_zip: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if as_zip:
        path = out / f"{job_id}.zip"
        with zipfile.ZipFile(path, "w") as archive:  # PNGs are compressed already
            for index, png in images.items():
                archive.writestr(f"{job_id}-{index}.png", png)
        return [path]
    paths = []
    for index, png in images.items():
        path = out / f"{job_id}-{index}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


def cmd_schema(args: argparse.Namespace) -> int:
    from .protocol import request_schema
    from .settings import limits_from_env

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
    from .protocol import PRESETS

    for name, preset in PRESETS.items():
        fields = ", ".join(f"{k}={v}" for k, v in preset.items() if k != "description")
        print(f"{name:10} {preset['description']}\n{'':10} {fields}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up,
    "orchestrator": cmd_orchestrator,
    "worker": cmd_worker,
    "request": cmd_request,
    "generate": cmd_generate,
    "blacklist": cmd_blacklist,
    "workers": cmd_workers,
    "stats": cmd_stats,
    "job": cmd_job,
    "schema": cmd_schema,
    "presets": cmd_presets,
}


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return COMMANDS[args.command](args)
    except BusUnavailable as exc:
        print(f"imagebus {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

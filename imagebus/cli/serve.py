"""The commands that run imagebus's processes: `up`, `orchestrator`, `worker`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..settings import OrchestratorSettings, WorkerSettings
from .common import (
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Commands,
    add_bus_options,
    add_command,
    add_database_option,
    bus_from,
    non_negative_float,
    non_negative_int,
    positive_int,
    say,
    serve_until_signalled,
)


def register(commands: Commands) -> None:
    add_up(commands)
    add_orchestrator(commands)
    add_worker(commands)


def add_up(commands: Commands) -> None:
    up = add_command(
        commands, "up", cmd_up, help="run NATS, PostgreSQL, an orchestrator and workers here"
    )
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
    up.add_argument("--no-web", action="store_true", help="do not start the web role")
    up.add_argument(
        "--web-port", type=int, default=8080, help="the web page and API's port (default 8080)"
    )


def add_orchestrator(commands: Commands) -> None:
    orch = add_command(commands, "orchestrator", cmd_orchestrator, help="run an orchestrator")
    add_bus_options(orch)
    add_database_option(orch)
    orch.add_argument(
        "--max-attempts",
        type=positive_int,
        default=None,
        help="recruitment asks per round (env IMAGEBUS_MAX_ATTEMPTS, default 10)",
    )
    add_metrics_port_option(orch)


def add_worker(commands: Commands) -> None:
    worker = add_command(commands, "worker", cmd_worker, help="run a diffusion worker")
    add_bus_options(worker)
    worker.add_argument(
        "--worker_id",
        "--worker-id",
        dest="worker_id",
        default=None,
        help="this worker's id (env IMAGEBUS_WORKER_ID; default derived from machine and device)",
    )
    worker.add_argument(
        "--model",
        default=None,
        help="tiny, a Hugging Face model id or a local directory; several, comma-separated,"
        " to hold several models (env IMAGEBUS_MODEL)",
    )
    worker.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    worker.add_argument(
        "--slots",
        type=non_negative_int,
        default=None,
        help="jobs taken at once (default: --max-batch; env IMAGEBUS_WORKER_SLOTS)",
    )
    worker.add_argument(
        "--max-batch",
        type=non_negative_int,
        default=None,
        help="dynamic batching: at most this many compatible images per pipeline call"
        " (default 1 on cpu, 8 on cuda; env IMAGEBUS_MAX_BATCH)",
    )
    worker.add_argument(
        "--batch-window-ms",
        type=non_negative_float,
        default=None,
        help="how long a batch that is not full waits for more images (default 5 ms)",
    )
    worker.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="store convolution weights NHWC (faster on most GPUs; env IMAGEBUS_CHANNELS_LAST=1)",
    )
    worker.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet: faster steps after a slow first call at each size"
        " (env IMAGEBUS_COMPILE=1)",
    )
    worker.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        help="torch CPU threads; 0 = all cores (env IMAGEBUS_TORCH_THREADS)",
    )
    worker.add_argument(
        "--noop-seconds",
        type=float,
        default=None,
        help="benchmarks only: with --model noop, each job sleeps this long",
    )
    add_metrics_port_option(worker)


def add_metrics_port_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=tcp_port,
        default=None,
        help="serve this process's Prometheus metrics on http://0.0.0.0:PORT/metrics"
        " (env IMAGEBUS_METRICS_PORT; default: not served)",
    )


def tcp_port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError("must be a TCP port, 1 to 65535")
    return number


def cmd_up(args: argparse.Namespace) -> int:
    from ..embedded import EmbeddedError
    from ..launcher import UpOptions, run_up

    if args.workers < 0:
        say("up", "--workers must be >= 0")
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
        web=not args.no_web,
        web_port=args.web_port,
    )
    try:
        return run_up(options)
    except EmbeddedError as exc:
        say("up", str(exc))
        return EXIT_UNAVAILABLE


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from ..orchestrator import Orchestrator

    settings = OrchestratorSettings.from_env(
        database_url=args.database_url,
        bus=bus_from(args),
        max_attempts=args.max_attempts,
        metrics_port=args.metrics_port,
    )
    orchestrator = Orchestrator(settings)
    try:
        asyncio.run(serve_until_signalled(orchestrator.start, orchestrator.stop))
    except OSError as exc:
        say("orchestrator", f"cannot reach PostgreSQL: {exc}")
        return EXIT_UNAVAILABLE
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from ..worker import Worker, WorkerIdInUse, default_worker_id
    from ..worker.engine import ModelLoadError

    settings = WorkerSettings.from_env(
        default_id=default_worker_id,
        worker_id=args.worker_id,
        model=args.model,
        device=args.device,
        bus=bus_from(args),
        slots=args.slots,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        channels_last=args.channels_last,
        compile_unet=args.compile,
        torch_threads=args.threads,
        noop_seconds=args.noop_seconds,
        metrics_port=args.metrics_port,
    )
    try:
        worker = Worker(settings)
        if settings.model != "noop":
            print(f"loading model {settings.model!r} on {settings.device}...", file=sys.stderr)
        asyncio.run(serve_until_signalled(worker.start, worker.stop))
    except (ValueError, ModelLoadError, WorkerIdInUse) as exc:
        say("worker", str(exc))
        return EXIT_USAGE
    return EXIT_OK

"""A worker's own Prometheus metrics (`--metrics-port`, IMAGEBUS_METRICS_PORT): images
made and failed, slots by state, batch sizes, its event loop's lag and, on a GPU, the
GPU memory torch holds. Built afresh at each scrape from the worker's status."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ..metrics import MetricsServer, batch_size_metric

if TYPE_CHECKING:
    from .service import Worker


def worker_metrics(worker: Worker) -> list[Metric]:
    status = worker.status()
    who = [worker.id]
    images = CounterMetricFamily(
        "imagebus_worker_images", "Images made or failed since the worker started.",
        labels=["worker", "outcome"],
    )  # fmt: skip
    images.add_metric([*who, "done"], status.tasks_done)
    images.add_metric([*who, "failed"], status.failures)
    slots = GaugeMetricFamily("imagebus_slots", "Worker slots, by state.", labels=["state"])
    slots.add_metric(["busy"], max(status.slots - status.free_slots, 0))
    slots.add_metric(["free"], status.free_slots)
    generating = GaugeMetricFamily("imagebus_worker_generating", "Images being made now.")
    generating.add_metric([], status.generating)
    lag = GaugeMetricFamily(
        "imagebus_event_loop_lag_seconds",
        "How late the worker's event loop runs callbacks, over the last minute.",
        labels=["quantile"],
    )
    summary = worker.loop_lag.summary()
    for quantile, key in (("0.5", "p50_ms"), ("0.99", "p99_ms"), ("1", "max_ms")):
        lag.add_metric([quantile], summary[key] / 1e3)
    metrics: list[Metric] = [images, slots, generating, batch_size_metric([worker.batch_sizes()])]
    metrics.append(lag)
    gpu = gpu_memory_metric(worker.settings.device)
    if gpu is not None:
        metrics.append(gpu)
    return metrics


def gpu_memory_metric(device: str) -> Metric | None:
    """torch's view of the GPU's memory; None on a CPU worker."""
    if not device.startswith("cuda"):
        return None
    import torch  # only a GPU worker pays for the import here (it has loaded torch already)

    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    family = GaugeMetricFamily(
        "imagebus_gpu_memory_bytes", "GPU memory, as torch sees it.", labels=["device", "kind"]
    )
    name = f"cuda:{index}"
    family.add_metric([name, "allocated"], torch.cuda.memory_allocated(index))
    family.add_metric([name, "reserved"], torch.cuda.memory_reserved(index))
    family.add_metric([name, "peak_allocated"], torch.cuda.max_memory_allocated(index))
    family.add_metric([name, "total"], torch.cuda.get_device_properties(index).total_memory)
    return family


def serve_metrics(port: int, worker: Worker) -> MetricsServer:
    async def take() -> list[Metric]:
        return worker_metrics(worker)

    return MetricsServer(port, take)

"""Where images are saved: one file name for every way an image comes in.

`{job id}-{index}.png`: a job id is unique and an index unique within its job, and
the name is known from the results stream too, where the seed is not.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path


def image_filename(job_id: str, index: int) -> str:
    return f"{job_id}-{index}.png"


def save_image(directory: str | Path, job_id: str, index: int, png: bytes) -> Path:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / image_filename(job_id, index)
    path.write_bytes(png)
    return path


def save_images(
    job_id: str, images: Mapping[int, bytes], directory: str | Path, *, as_zip: bool = False
) -> list[Path]:
    """Every image of a job, by index: one file each, or one zip `{job id}.zip` of them."""
    if not as_zip:
        return [save_image(directory, job_id, index, png) for index, png in images.items()]
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_id}.zip"
    with zipfile.ZipFile(path, "w") as archive:  # PNGs are compressed already
        for index, png in images.items():
            archive.writestr(image_filename(job_id, index), png)
    return [path]

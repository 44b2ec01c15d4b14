# imagebus: one image for every role (orchestrator, worker, request, generate, ...).
#
#   docker build -t imagebus .                 # CPU torch (the default)
#   docker run --rm imagebus --help
#
# A CUDA image: point TORCH_INDEX_URL at a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t imagebus:cuda .
# and run the worker with `--device cuda` on a host with the NVIDIA container toolkit
# (see the commented GPU example in docker-compose.yml).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    IMAGEBUS_LOG_FORMAT=json

# torch first, from TORCH_INDEX_URL, so ".[worker]" below finds it installed
# and does not pull the (much larger) default build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

WORKDIR /src
COPY pyproject.toml README.md ./
COPY imagebus/ imagebus/
RUN pip install ".[worker]" && rm -rf /src

RUN useradd --create-home --uid 1000 imagebus \
    && mkdir -p /app /models \
    && chown imagebus:imagebus /app /models

USER imagebus
WORKDIR /app
# The Hugging Face cache (downloaded weights); mount a named volume here.
VOLUME ["/models"]

ENTRYPOINT ["imagebus"]
CMD ["worker"]

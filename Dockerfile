# robustact: one image for the API (`robustact serve`) and the workers (`robustact worker`).
#
#   docker build -t robustact .                      # CPU build of PyTorch (default)
#   docker build -t robustact:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#
# TORCH_INDEX_URL picks the PyTorch wheel variant: .../whl/cpu (default, small), or a CUDA
# index .../whl/cuNNN for which torch ${TORCH_VERSION} is published and that the host's
# NVIDIA driver supports (the CUDA wheels bundle their runtime, so the base image stays
# python:3.11-slim; the host needs the NVIDIA container toolkit). PyAV's wheels bundle
# FFmpeg, so no system codec libraries are installed.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/robustact

# PyTorch first, from the chosen index: `pip install .` then finds torch==2.13.0 already
# satisfied (a local version such as 2.13.0+cpu matches) and does not pull another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY robustact ./robustact
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . \
    && useradd --create-home --uid 1000 robustact \
    && mkdir -p /srv/robustact/var \
    && chown robustact:robustact /srv/robustact/var

USER robustact
# Local scratch (uploads, caches); the system of record is Postgres + the object store.
ENV ROBUSTACT_DATA_DIR=/srv/robustact/var
EXPOSE 8000
CMD ["robustact", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

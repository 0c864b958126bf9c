# stembot images, models baked in, offline at run time. Two targets:
#
#   bot (the default, the last stage): the bot with its local worker (embedded mode), or the
#   bot alone in distributed mode (STEMBOT_QUEUE=postgres).
#
#     docker build -t stembot .
#     docker run --env-file .env -v stembot-data:/data -p 8080:8080 stembot
#
#   Port 8080 serves download links only. Health and metrics (/livez, /readyz, /metrics)
#   are on 8081 (STEMBOT_OPS_PORT) on the container's loopback, for its HEALTHCHECK; publish
#   that port to no one (README.md, "Health and metrics").
#
#   worker: `stembot worker` for a GPU host in distributed mode, on NVIDIA's CUDA base image.
#
#     docker build --target worker -t stembot-worker .
#     docker run --gpus all -e STEMBOT_DATABASE_URL=postgresql+asyncpg://... stembot-worker
#
# Needs BuildKit (the default builder since Docker 23), which builds only the stages the
# chosen target uses; the legacy builder would build the worker for the bot too.
#
# Build arguments:
#   TORCH_SPEC    what pip installs for PyTorch first (the lock, requirements/app.lock, holds
#                 everything else). bot: the PyPI build, which runs on CUDA
#                 GPUs and on CPUs (for a bot that only queues jobs, a CPU-only wheel is much
#                 smaller: "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
#                 worker: the CUDA 12.8 build (needs an NVIDIA driver >= 570 on the host).
#   MODELS        models to pull into the image (space-separated); give bot and worker the
#                 same list
#   PYTHON_IMAGE  the bot's base image (Python 3.11 or newer, Debian)
#   CUDA_IMAGE    the worker's base image: NVIDIA's CUDA runtime on Ubuntu 24.04 (Python 3.12).
#                 PyTorch's CUDA wheels also bring their own CUDA libraries, so the smaller
#                 `...-base-ubuntu24.04` flavour works too.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# The sources both images install, in one place so that they cannot drift apart.
FROM scratch AS source
COPY pyproject.toml README.md alembic.ini /src/
COPY requirements /src/requirements
COPY scripts/lockfile.py /src/scripts/lockfile.py
COPY core /src/core
COPY bot /src/bot
COPY stembot /src/stembot
COPY migrations /src/migrations


# ---- worker: `stembot worker`, one model host per GPU --------------------------------------
FROM ${CUDA_IMAGE} AS worker

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
ARG MODELS="htdemucs"

# NUMBA_CACHE_DIR: numba compiles librosa's functions (the tempo and key analysis) once and
# keeps them there, on the volume; it needs a writable folder, and the root filesystem is
# read-only under docker-compose.yml.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/stembot/venv/bin:$PATH \
    HF_HOME=/opt/stembot/hf \
    STEMBOT_DATA_DIR=/data \
    STEMBOT_QUEUE=postgres \
    NUMBA_CACHE_DIR=/data/numba-cache

# Ubuntu's Python refuses system-wide pip installs (PEP 668): stembot gets a virtual environment.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/stembot/venv \
    && useradd --create-home --uid 10001 stembot \
    && mkdir -p /data && chown stembot /data

WORKDIR /opt/stembot/src
# torch first and on its own layer: it is large and changes rarely.
RUN pip install ${TORCH_SPEC}
# Then exactly the versions a venv of the same commit gets (scripts/setup): the lock, each
# file checked against its hash, nothing resolved afresh; then stembot itself.
COPY --from=source /src/requirements ./requirements
RUN pip install --no-deps --require-hashes -r requirements/app.lock
COPY --from=source /src ./
RUN python scripts/lockfile.py check requirements/app.lock \
    && pip install --no-deps . \
    && python scripts/lockfile.py pip-check

# Fill the HuggingFace cache now, then never touch the network for models again.
RUN for model in ${MODELS}; do stembot models pull "$model"; done
ENV HF_HUB_OFFLINE=1

USER stembot
# Scratch space for a job's input and stems while it runs; the bot's object store keeps them.
WORKDIR /data
# SIGTERM drains: the running job finishes and no new one is taken, so give the container
# time to stop (`docker stop -t 600`; stop_grace_period in compose).
CMD ["stembot", "worker"]


# ---- bot (default): `stembot run` ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS bot

ARG TORCH_SPEC="torch==2.13.0"
ARG MODELS="htdemucs"

# NUMBA_CACHE_DIR: numba compiles librosa's functions (the tempo and key analysis) once and
# keeps them there, on the volume; it needs a writable folder, and the root filesystem is
# read-only under docker-compose.yml.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/stembot/hf \
    STEMBOT_DATA_DIR=/data \
    NUMBA_CACHE_DIR=/data/numba-cache \
    STEMBOT_WEB_HOST=0.0.0.0 \
    STEMBOT_WEB_PORT=8080 \
    STEMBOT_OPS_HOST=127.0.0.1 \
    STEMBOT_OPS_PORT=8081

RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 stembot \
    && mkdir -p /data && chown stembot /data

WORKDIR /opt/stembot/src
# torch first and on its own layer: it is large and changes rarely.
RUN pip install ${TORCH_SPEC}
# Then exactly the versions a venv of the same commit gets (scripts/setup): the lock, each
# file checked against its hash, nothing resolved afresh; then stembot itself.
COPY --from=source /src/requirements ./requirements
RUN pip install --no-deps --require-hashes -r requirements/app.lock
COPY --from=source /src ./
RUN python scripts/lockfile.py check requirements/app.lock \
    && pip install --no-deps . \
    && python scripts/lockfile.py pip-check

# Fill the HuggingFace cache now, then never touch the network for models again.
RUN for model in ${MODELS}; do stembot models pull "$model"; done
ENV HF_HUB_OFFLINE=1

USER stembot
WORKDIR /data
VOLUME /data
EXPOSE 8080
# On the operators' listener, which only the container itself reaches.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('STEMBOT_OPS_PORT', '8081'), timeout=4)"
CMD ["stembot", "run"]

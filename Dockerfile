# stembot: the bot with its local worker (embedded mode), models baked in, offline at run time.
#
#   docker build -t stembot .
#   docker run --env-file .env -v stembot-data:/data -p 8080:8080 stembot
#
# Build arguments:
#   TORCH_SPEC  what pip installs for PyTorch first (default: the PyPI build, which runs on
#               CUDA GPUs and on CPUs; point it at a CPU-only wheel index for a smaller image)
#   MODELS      models to pull into the image (space-separated)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG MODELS="htdemucs"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/stembot/hf \
    STEMBOT_DATA_DIR=/data \
    STEMBOT_WEB_HOST=0.0.0.0 \
    STEMBOT_WEB_PORT=8080

RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 stembot \
    && mkdir -p /data && chown stembot /data

WORKDIR /opt/stembot/src
# torch first and on its own layer: it is large and changes rarely.
RUN pip install ${TORCH_SPEC}
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY bot bot
COPY stembot stembot
COPY migrations migrations
RUN pip install .

# Fill the HuggingFace cache now, then never touch the network for models again.
RUN for model in ${MODELS}; do stembot models pull "$model"; done
ENV HF_HUB_OFFLINE=1

USER stembot
WORKDIR /data
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=4)"
CMD ["stembot", "run"]

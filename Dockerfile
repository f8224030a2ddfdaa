# One image for the API and the GPU worker. The CUDA runtime base lets the worker use the host's
# GPUs (with the NVIDIA container toolkit); the API ignores them.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TUNEQ_HOME=/data \
    HF_HOME=/hf-cache

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY trainer ./trainer
COPY tuneq ./tuneq
COPY migrations ./migrations
# The CUDA build of the pinned torch line first, then tuneq with the rest of its pins.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && pip install -e .

RUN useradd --create-home --uid 1000 tuneq \
 && mkdir -p /data /hf-cache \
 && chown -R tuneq:tuneq /data /hf-cache /app
USER tuneq

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

# `api` (default) or `worker`; see docker-compose.yml.
CMD ["sh", "-c", "python -m core.migrate && uvicorn api.main:app --host 0.0.0.0 --port 8000"]

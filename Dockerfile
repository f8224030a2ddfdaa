# One image for every role: API, GPU worker, migrations, Flower (docker/entrypoint.sh picks one).
# The CUDA runtime base lets the worker use the host's GPUs through the NVIDIA container
# toolkit; the API and Flower ignore them. Built and run with docker-compose.yml.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment with the pinned stack ----------------------------------------
FROM ${CUDA_IMAGE} AS build
# The CUDA build of the pinned torch line (pyproject pins the version, CI uses the CPU build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies before the code: a code change then rebuilds only the last layers.
COPY pyproject.toml ./
RUN python -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
torch = [d for d in p['dependencies'] if re.match(r'torch\b', d)]; \
open('/tmp/torch.txt', 'w').write('\n'.join(torch)); \
open('/tmp/deps.txt', 'w').write('\n'.join(p['dependencies'] + p['optional-dependencies']['deploy']))" \
 && pip install --index-url "${TORCH_INDEX}" -r /tmp/torch.txt \
 && pip install -r /tmp/deps.txt
COPY README.md alembic.ini ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY trainer ./trainer
COPY tuneq ./tuneq
COPY migrations ./migrations
# Editable: core.migrate finds alembic.ini and migrations/ next to the code in /app.
RUN pip install --no-deps -e .

# ---- runtime -------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    TUNEQ_HOME=/data \
    HF_HOME=/hf-cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --user-group tuneq \
 && mkdir -p /data /hf-cache /models \
 && chown tuneq:tuneq /data /hf-cache
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY docker/entrypoint.sh /usr/local/bin/tuneq-entrypoint
WORKDIR /app
USER tuneq

EXPOSE 8000
# The API's check; docker-compose.yml gives the worker and Flower checks of their own.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

# tini reaps the trainer's children and passes SIGTERM on, so a worker's warm shutdown re-queues its jobs.
ENTRYPOINT ["tini", "--", "tuneq-entrypoint"]
CMD ["api"]

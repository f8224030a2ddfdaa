#!/usr/bin/env bash
# Builds .devsite/site.tar.gz: the Python packages the lent H200 lacks, for Python 3.12 x86_64,
# as one archive that travels with the working tree (`carry: [".devsite"]`).
#
# The device cannot fetch anything, and its image already holds torch and the rest of the trainer's
# stack; requirements/device-site.in says what this archive adds and why, and
# requirements/device-site.txt pins exactly that (hashes included; `make lock` refreshes it).
# Everything is installed with --no-deps, so that list is the whole closure. Re-run after
# `make lock`; the archive is rebuilt whole.
#
# On the device, before any Python:
#   mkdir -p /tmp/site && tar xzf .devsite/site.tar.gz -C /tmp/site \
#     && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 || exit;
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
PY=${PY:-python3}
OUT_DIR=.devsite
ARCHIVE=$OUT_DIR/site.tar.gz
# The 64 MiB carry limit holds the repository too.
MAX_MIB=${MAX_MIB:-55}

LOCK=requirements/device-site.txt

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
site=$stage/site

# pip matches each manylinux tag exactly, so name every one a wheel here might carry.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done

PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --target "$site" --no-deps --require-hashes --only-binary=:all: --no-compile \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${platforms[@]}" -r "$LOCK"

# Size: the device loads one bitsandbytes library for its CUDA 13 torch, and bitsandbytes falls
# back within a major version (a 13.x runtime takes cuda130); the other builds are 100+ MB.
find "$site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130.so' -delete
# Unsloth's web app (about 80 MB) is a top-level package nothing in the training path imports.
rm -rf "$site/studio"
# Console scripts point at the build machine's interpreter; bytecode would be for the wrong one.
rm -rf "$site/bin"
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
# Test suites shipped inside wheels; no package imports its own tests at run time.
find "$site" -mindepth 2 -maxdepth 3 -type d -name tests -prune -exec rm -rf {} +

mkdir -p "$OUT_DIR"
# Sorted names and fixed metadata: the same pins give the same bytes.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
    -C "$site" -cf - . | gzip -9n >"$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"

# What the archive holds, as name==version, for the report and the bench table.
for info in "$site"/*.dist-info; do
    sed -n 's/^Name: //p; s/^Version: //p' "$info/METADATA" | paste -sd= | sed 's/=/==/'
done | sort -f >"$OUT_DIR/site.txt"

# The compiled wheels are the ones a wrong tag would break; import them from the archive with a
# local Python 3.12 where there is one (the torch-dependent rest can only be tried on the device).
if [[ -z "${PY312:-}" ]]; then
    # A pyenv shim answers to python3.12 even where it cannot run one, so try each candidate.
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c pass 2>/dev/null; then PY312=$candidate; break; fi
    done
fi
if [[ -n "${PY312:-}" ]]; then
    check=$stage/check
    mkdir -p "$check" && tar xzf "$ARCHIVE" -C "$check"
    PYTHONPATH=$check "$PY312" -I -c '
import sys; sys.path.insert(0, sys.argv[1])
import pydantic, pydantic_core, msgspec, dill, multiprocess, typing_extensions, annotated_types, typing_inspection
class Row(pydantic.BaseModel):
    n: int
assert Row(n="3").n == 3 and msgspec.json.decode(b"[1]") == [1]
print("checked with Python", sys.version.split()[0], ": pydantic", pydantic.VERSION, "msgspec", msgspec.__version__)
' "$check"
else
    echo "no Python 3.12 here: the compiled wheels (pydantic-core, msgspec) were not import-checked"
fi

size=$(stat -c %s "$ARCHIVE")
echo "$ARCHIVE: $((size / 1024 / 1024)) MiB ($size bytes), $(wc -l <"$OUT_DIR/site.txt") packages"
cat "$OUT_DIR/site.txt"
if ((size > MAX_MIB * 1024 * 1024)); then
    echo "error: $ARCHIVE is over $MAX_MIB MiB; with the repository it would not fit the 64 MiB carry limit" >&2
    exit 1
fi

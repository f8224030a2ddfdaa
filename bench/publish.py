"""Publishing a full model: time and peak extra disk, the earlier way against the current one.

    PYTHONPATH=$PWD .venv/bin/python bench/publish.py [--shape llama-0.5b] [--dir /tmp/tuneq-bench-publish]

Builds the shape (random weights, bf16) as a finished job's work directory (final/ with the
trainer's manifest) and publishes it into a local store on the same disk:

- `gzip archive (before)`: the earlier publisher, kept here as the reference: every file of
  final/ copied into the store, then a tar.gz of final/ written beside it and copied in.
- `stored once (now)`: worker.artifacts.publish_final (files linked into the store and removed from
  the work directory, the archive
  a recipe whose length and sha256 come from one read).

Peak extra disk: the most bytes on disk (work dir + store, hard links counted once) above what
final/ took before publishing, sampled every 50 ms. Also the rate at which the API streams the
.tar.gz download (stored deflate blocks, hashed as the CLI does). Prints a table and writes
bench/results/publish.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from core.archive import Index
from core.storage import LocalStorage
from trainer.export import sha256_of
from trainer.tiny import build_shape
from worker.artifacts import publish_final

RESULTS = Path(__file__).resolve().parent / "results" / "publish.md"


def on_disk(*roots: Path) -> int:
    seen, total = set(), 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                try:
                    st = os.lstat(os.path.join(dirpath, n))
                except FileNotFoundError:  # moved or removed while walking
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


class PeakDisk:
    def __init__(self, *roots: Path):
        self.roots, self.base, self.peak = roots, on_disk(*roots), 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, on_disk(*self.roots) - self.base)

    def __enter__(self) -> PeakDisk:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, on_disk(*self.roots) - self.base)


def make_job_dir(model: Path, work: Path) -> Path:
    """A work directory as the trainer leaves it: final/ with every file and manifest.json."""
    final = work / "final"
    shutil.copytree(model, final)
    files = {p.relative_to(final).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(final.rglob("*")) if p.is_file()}
    (final / "manifest.json").write_text(json.dumps({"created": time.time(), "metrics": {}, "files": files}))
    return final


def gzip_publish(storage: LocalStorage, job_id: str, final: Path) -> None:
    """The earlier publisher: a copy of every file, and a tar.gz of final/ stored whole."""
    for path in sorted(p for p in final.rglob("*") if p.is_file()):
        storage.put_file(f"jobs/{job_id}/final/{path.relative_to(final).as_posix()}", path)
    tmp = final.parent / ".model.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(final, arcname="model")
    storage.put_file(f"jobs/{job_id}/model.tar.gz", tmp)
    tmp.unlink()


def run(name: str, model: Path, root: Path, publish) -> dict:  # noqa: ANN001
    shutil.rmtree(root, ignore_errors=True)
    work, store = root / "work", root / "store"
    final = make_job_dir(model, work)
    storage = LocalStorage(store)
    job = SimpleNamespace(id="ftjob-bench", method="full")
    with PeakDisk(work, store) as peak:
        t0 = time.perf_counter()
        publish(storage, job, final)
        seconds = time.perf_counter() - t0
    row = {"way": name, "seconds": seconds, "peak_extra_mb": peak.peak / 1e6,
           "after_mb": (on_disk(work, store) - peak.base) / 1e6}
    index_key = "jobs/ftjob-bench/model.tar.gz.index.json"
    if storage.exists(index_key):  # the download the API streams, with the CLI's sha256 check
        index, digest, t0 = Index.from_json(storage.path(index_key).read_bytes()), hashlib.sha256(), time.perf_counter()
        for chunk in index.stream(storage.iter_bytes):
            digest.update(chunk)
        row["download_mb_s"] = index.size() / 1e6 / (time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-0.5b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tuneq-bench-publish"))
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the table is written")
    args = ap.parse_args()
    model = args.dir / "model"
    if not (model / "config.json").is_file():
        build_shape(model, args.shape)
    size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 1e6
    rows = [
        run("gzip archive (before)", model, args.dir / "run", lambda s, j, f: gzip_publish(s, j.id, f)),
        run("stored once (now)", model, args.dir / "run", publish_final),
    ]
    lines = [
        f"# Publishing a full model ({args.shape}, {size_mb:.0f} MB in final/)", "",
        f"bench/publish.py on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; local store on the work dir's disk.", "",
        "| way | publish s | peak extra disk MB | extra disk after MB | .tar.gz download stream MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        dl = f"{r['download_mb_s']:.0f}" if "download_mb_s" in r else "(file)"
        lines.append(f"| {r['way']} | {r['seconds']:.1f} | {r['peak_extra_mb']:.0f} | {r['after_mb']:.0f} | {dl} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()

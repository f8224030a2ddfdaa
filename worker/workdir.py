"""The job's work directory: spec.json in, trainer command out (docs/internals.md)."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

import trainer.spec
from core.identity import DELETED
from core.models import File, Job
from core.ports import free_port
from core.settings import Settings
from core.storage import get_storage
from trainer.spec import JobSpec
from trainer.vocabulary import extra_files, with_files
from worker.continuation import resolve_init_from

# The worker may run from anywhere; the trainer package is importable from where trainer.spec is.
CODE_ROOT = Path(trainer.spec.__file__).resolve().parents[1]


class SpecError(ValueError):
    """The stored spec cannot be turned into a runnable one; `param` names the field, `code` the
    error the job fails with."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_spec"):
        super().__init__(message)
        self.param = param
        self.code = code


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.resolved_work_dir() / job_id


def _local_file(db: Session, field: str, file_id: str) -> str:
    """Where the trainer reads a stored file the job names; SpecError when it no longer exists.

    A file deleted (its row kept, its bytes gone) or missing from storage cannot come back by
    retrying: the job fails at once, naming the file, rather than crash the attempt and be
    re-queued until its retries run out.
    """
    f = db.get(File, file_id)
    if f is None or f.status == DELETED:
        raise SpecError(f"{field}: file {file_id} does not exist (deleted?); upload it again and create a new job",
                        field, "file_not_found")
    try:
        # A local copy: the trainer reads files, and S3 storage keeps them in a bucket.
        return str(get_storage().local_path(f.storage_key))
    except FileNotFoundError:
        raise SpecError(f"{field}: the content of file {file_id} is missing from storage; upload it again and "
                        "create a new job", field, "file_not_found") from None


def runnable_spec(db: Session, job: Job) -> dict[str, Any]:
    """job.spec with its file ids replaced by local paths, checked against JobSpec."""
    spec = dict(job.spec)
    for field in ("training_file", "validation_file"):
        file_id = spec.get(field)
        if file_id:
            spec[field] = _local_file(db, field, file_id)
    # Replay, forgetting and eval files are stored files named by id, like training_file.
    spec = with_files(spec, {field: _local_file(db, field, file_id) for field, file_id, _ in extra_files(spec)})
    if spec.get("init_from"):
        try:
            spec["init_from"] = resolve_init_from(db, spec["init_from"])
        except ValueError as exc:
            raise SpecError(str(exc), "from_checkpoint") from None
    try:
        JobSpec.model_validate(spec)
    except ValueError as exc:
        raise SpecError(f"spec is not valid: {exc}") from exc
    # Written as given, not re-dumped: a dump would set defaults the trainer reads as explicit
    # choices (e.g. `lora` on a full fine-tune).
    return spec


def write_spec(work_dir: Path, spec: dict[str, Any]) -> Path:
    path = work_dir / "spec.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    tmp.replace(path)
    return path


def rendezvous_addr(settings: Settings) -> str:
    """Where the other hosts of a job this host leads reach its rank 0."""
    return settings.rendezvous_addr or socket.gethostname()


def rendezvous_port(settings: Settings) -> int:
    """A free port of TUNEQ_RENDEZVOUS_PORTS (the range a firewall lets the other hosts reach), tried
    from a random place in it so that two jobs this host leads at once seldom try the same one."""
    first, last = (int(p) for p in settings.rendezvous_ports.split("-"))
    ports = list(range(first, last + 1))
    start = random.randrange(len(ports))
    for port in ports[start:] + ports[:start]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in TUNEQ_RENDEZVOUS_PORTS {settings.rendezvous_ports}")


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a job across several hosts meet: the leader host's address and a port it
    chose (rank 0 runs there), how many hosts take part, and which of them this one is."""

    addr: str
    port: int
    nodes: int
    node_rank: int


def trainer_argv(settings: Settings, spec_path: Path, work_dir: Path, resume: bool, num_processes: int = 1,
                 rendezvous: Rendezvous | None = None) -> list[str]:
    """The command that runs the trainer as `num_processes` processes (one per leased GPU) on this
    host, joined with the other hosts' processes at `rendezvous` when the job spans several.

    One process is started directly: `accelerate launch` would only add a second interpreter that
    imports torch before the trainer does (seconds before the first step), since the trainer
    builds its Accelerator from the spec itself. Several need `--multi_gpu`:
    without it accelerate starts one process whatever --num_processes says. That path is torchrun
    underneath, which also works on a CPU host (gloo), and which stops every rank when one dies
    (--max_restarts 0: a restart is the worker's business, from the newest checkpoint). Across
    hosts, accelerate's --num_processes counts the processes of all of them.
    """
    cmd = ["-m", "trainer", "run", str(spec_path), "--out", str(work_dir)]
    if resume:
        cmd.append("--resume")
    if num_processes > 1 or rendezvous is not None:
        # A port of its own: two multi-GPU jobs on one host must not share torchrun's default 29500.
        port = str(rendezvous.port if rendezvous else free_port())
        addr = rendezvous.addr if rendezvous else "127.0.0.1"
        nodes = rendezvous.nodes if rendezvous else 1
        if settings.accelerate_launch:
            machines = ["--num_machines", str(nodes)]
            if rendezvous is not None:
                machines += ["--machine_rank", str(rendezvous.node_rank), "--main_process_ip", addr]
            launch = [
                "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes * nodes),
                *machines, "--main_process_port", port, "--max_restarts", "0",
                "--monitor_interval", "0.5", "--mixed_precision", "no", "--dynamo_backend", "no",
            ]
        else:
            node_rank = ["--node_rank", str(rendezvous.node_rank)] if rendezvous is not None else []
            launch = [
                "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--nnodes", str(nodes),
                *node_rank, "--master_addr", addr, "--master_port", port, "--max_restarts", "0", "--monitor_interval", "0.5",
            ]
        return [sys.executable, *launch, *cmd]
    return [sys.executable, *cmd]


# A benchmark switch (trainer.model): it must never reach a served job's trainer.
BENCH_ONLY_ENV = ("TUNEQ_RANDOM_INIT",)


def trainer_env(settings: Settings | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CODE_ROOT), env.get("PYTHONPATH", "")) if p)
    # Events and logs must reach their files as they happen, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    # Triton kernels' autotuning results kept in its on-disk cache: a later job skips the search.
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    for name in BENCH_ONLY_ENV:
        env.pop(name, None)
    if settings is not None:
        # How long a rank waits in a collective for a peer that stopped answering.
        env["TUNEQ_DIST_TIMEOUT_S"] = str(settings.dist_timeout_s)
    return env

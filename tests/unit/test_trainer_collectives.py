"""Collectives per optimizer step of a two-process job, counted on two gloo (CPU) ranks.

Every collective is a point where the ranks wait for each other and the host waits for the GPU;
on two H200s they were the suspected part of DDP's per-step overhead. The test runs the real
trainer (trainer.job.run_job, DDP as build_accelerator configures it) under torch.distributed.run,
with torch.distributed's Python collectives and DDP's buffer broadcast wrapped by counters and a
counting DDP comm hook (DDP's gradient all-reduce runs in C++ and is only visible that way). The
counters are read at the start of every step, so a step's count includes its logging and its
checkpoint and pause decisions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter_tensor", "gather", "scatter")


def test_a_ddp_step_costs_one_scalar_all_reduce_and_one_gradient_sync(tmp_path: Path, tiny_model_dir: Path) -> None:
    from core.ports import free_port

    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(32):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                             {"role": "assistant", "content": " ".join(str(k) for k in range(i % 7 + 1))}]}) + "\n")
    spec = {
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(data), "precision": "fp32",
        "hyperparameters": {"max_steps": STEPS, "batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_len": 32,
                            "warmup_steps": 0},
        # Metrics every second step; a time-based checkpoint that is never due still has to be agreed on.
        "schedule": {"log_every_steps": 2, "checkpoint_every_minutes": 1000},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TUNEQ_DIST_TIMEOUT_S": "60"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), __file__, str(tmp_path / "spec.json"), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "out" / "collectives.json").read_text())

    assert got["exit"] == 0
    # Constant buffers (rotary frequencies) are not re-broadcast before every forward; gradients
    # are reduced straight from their buckets.
    assert got["ddp"] == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    steps = got["steps"]
    assert len(steps) == STEPS - 1  # the last step runs into the end of training: not a plain step
    for n, counted in enumerate(steps, start=1):
        # One all_reduce of the step's scalars: label tokens, loss sums, pause and checkpoint votes.
        assert counted.pop("all_reduce", 0) == 1, (n, steps)
        # The gradients are all-reduced once per window of 2 micro-batches (the tiny adapter is
        # one bucket), not after each micro-batch.
        assert counted.pop("ddp_gradient_bucket", 0) == 1, (n, steps)
        assert not {k: v for k, v in counted.items() if v}, (n, steps)


def test_sharded_gradients_are_scaled_shard_by_shard(tmp_path: Path) -> None:
    # Several ranks scale their gradients after the step's all-reduce; under FSDP2 those are DTensors.
    from core.ports import free_port

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), __file__, "fsdp", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "scaled").read_text() == "ok"


def _fsdp_rank_main(out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from trainer.distributed import scale_gradients

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    model(torch.randn(4, 8)).sum().backward()
    assert all(isinstance(p.grad, DTensor) for p in model.parameters())
    before = [p.grad.full_tensor().clone() for p in model.parameters()]
    scale_gradients(model, 0.25)
    after = [p.grad.full_tensor() for p in model.parameters()]
    assert all(torch.equal(a, b * 0.25) for a, b in zip(after, before))
    if dist.get_rank() == 0:
        (Path(out) / "scaled").write_text("ok")
    # Without it, one rank can tear gloo down while the other is still in its last full_tensor()
    # gather, and the process aborts ("terminate called without an active exception").
    dist.barrier()
    # Leave without running gloo's and FSDP's C++ destructors: on a loaded machine they still
    # aborted a rank now and then after the barrier, a teardown failure that says nothing about
    # the scaling this test checks (its result is written above, before the barrier).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_main(spec_path: str, out: str) -> None:
    """One rank (run by torch.distributed.run): the trainer with counted collectives."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    counts: Counter[str] = Counter()
    all_reduce = dist.all_reduce

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    DistributedDataParallel._distributed_broadcast_coalesced = counted(
        "ddp_buffer_broadcast", DistributedDataParallel._distributed_broadcast_coalesced)
    ddp_settings: dict[str, bool] = {}
    ddp_init = DistributedDataParallel.__init__

    def init(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)
        ddp_settings.update(broadcast_buffers=self.broadcast_buffers,
                            gradient_as_bucket_view=self.gradient_as_bucket_view)

        def hook(state, bucket):
            # DDP's own averaging all-reduce, through the uncounted collective: counted once, here.
            counts["ddp_gradient_bucket"] += 1
            tensor = bucket.buffer().div_(dist.get_world_size())
            return all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

        self.register_comm_hook(None, hook)

    DistributedDataParallel.__init__ = init

    import trainer.loop
    from trainer.job import run_job
    from trainer.spec import JobSpec

    snapshots: list[Counter[str]] = []
    queue_forward_backward = trainer.loop.queue_forward_backward

    def at_step_start(*args, **kwargs):
        snapshots.append(Counter(counts))
        return queue_forward_backward(*args, **kwargs)

    trainer.loop.queue_forward_backward = at_step_start
    code = run_job(JobSpec.model_validate_json(Path(spec_path).read_text()), out)
    if os.environ["RANK"] == "0":
        steps = [dict(after - before) for before, after in zip(snapshots, snapshots[1:])]
        (Path(out) / "collectives.json").write_text(json.dumps({"exit": code, "ddp": ddp_settings, "steps": steps}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "fsdp":
        _fsdp_rank_main(sys.argv[2])
    else:
        _rank_main(sys.argv[1], sys.argv[2])

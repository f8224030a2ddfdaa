"""Several processes per job: strategy choice, launch command, failures, FSDP state on two CPU ranks.

The FSDP test shards a small Llama with torch's fully_shard over two gloo processes (accelerate
enables FSDP only on GPUs; the GPU path is tests/gpu/test_multi_gpu.py) and checks that the
checkpoint code gathers the shards on rank 0, that a fresh pair of ranks resumes from it to the
same next loss, and that the exported model is the whole model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def spec(method: str = "lora", **top):
    from trainer.spec import JobSpec

    return JobSpec.model_validate({"model": "/m", "method": method, "training_file": "/t.jsonl", **top})


# --- strategy --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "asked", "processes", "expected"), [
    ("lora", "auto", 1, "single"),
    ("full", "fsdp", 1, "single"),
    ("lora", "auto", 2, "ddp"),
    ("qlora", "auto", 4, "ddp"),
    ("full", "auto", 2, "fsdp"),
    ("freeze", "auto", 2, "fsdp"),
    ("full", "ddp", 2, "ddp"),
    ("full", "fsdp", 8, "fsdp"),
])
def test_strategy_follows_method_and_process_count(method, asked, processes, expected) -> None:
    from trainer.distributed import resolve_strategy

    extra = {"freeze": {"trainable_layers": 1}} if method == "freeze" else {}
    assert resolve_strategy(spec(method, strategy=asked, **extra), processes) == expected


def test_fsdp_for_an_adapter_method_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"strategy: fsdp shards full fine-tuning .* not 'lora'"):
        spec("lora", strategy="fsdp")
    with pytest.raises(ValueError, match="strategy"):
        spec("full", strategy="zero3")


def test_fsdp_needs_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.distributed import build_accelerator
    from trainer.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="strategy: fsdp needs GPUs"):
        build_accelerator(spec("full", strategy="fsdp"), cuda=False, bf16=False)


def test_fsdp_wraps_the_decoder_layer_class(tmp_path: Path) -> None:
    from trainer.distributed import decoder_layer_classes, fsdp_plugin

    tiny_config(tmp_path)
    assert decoder_layer_classes(str(tmp_path)) == ["LlamaDecoderLayer"]
    plugin = fsdp_plugin(spec("full", model=str(tmp_path)), bf16=True)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    # The model's own gradient checkpointing recomputes the layers; FSDP must not do it a second time.
    assert plugin.activation_checkpointing is False
    policy = plugin.mixed_precision_policy
    assert str(policy.param_dtype) == "torch.bfloat16" and str(policy.reduce_dtype) == "torch.float32"


def test_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.distributed import DEFAULT_TIMEOUT_S, timeout_s

    monkeypatch.setenv("TUNEQ_DIST_TIMEOUT_S", "42")
    assert timeout_s() == 42
    monkeypatch.setenv("TUNEQ_DIST_TIMEOUT_S", "nonsense")
    assert timeout_s() == DEFAULT_TIMEOUT_S


def test_collective_failures_are_told_apart_from_bugs(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trainer.distributed import is_distributed_failure

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:49341: Connection reset by peer.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert is_distributed_failure(gloo)
    assert is_distributed_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not is_distributed_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_distributed_failure(ValueError("gloo"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not is_distributed_failure(gloo)


# --- launch command -------------------------------------------------------------------------


def test_k_processes_launch_with_multi_gpu_and_a_port_of_their_own(tmp_path: Path) -> None:
    from core.settings import Settings
    from worker.workdir import trainer_argv

    on = Settings(accelerate_launch=True)
    two = trainer_argv(on, tmp_path / "spec.json", tmp_path, resume=True, num_processes=2)
    assert two[1:3] == ["-m", "accelerate.commands.launch"]
    # Without --multi_gpu accelerate starts one process whatever --num_processes says.
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    assert two[two.index("--max_restarts") + 1] == "0"
    port = int(two[two.index("--main_process_port") + 1])
    assert port != 29500 and 1024 <= port < 65536
    assert two[-6:] == ["trainer", "run", str(tmp_path / "spec.json"), "--out", str(tmp_path), "--resume"]

    # One process needs no launcher: a second interpreter importing torch first costs seconds.
    one = trainer_argv(on, tmp_path / "spec.json", tmp_path, resume=False, num_processes=1)
    assert one[1:4] == ["-m", "trainer", "run"]

    off = trainer_argv(Settings(accelerate_launch=False), tmp_path / "spec.json", tmp_path, False, num_processes=3)
    assert off[1:3] == ["-m", "torch.distributed.run"] and off[off.index("--nproc_per_node") + 1] == "3"
    assert trainer_argv(Settings(accelerate_launch=False), tmp_path / "s", tmp_path, False)[1:3] == ["-m", "trainer"]


def test_a_host_of_a_job_across_hosts_joins_the_leaders_rendezvous(tmp_path: Path) -> None:
    from core.settings import Settings
    from worker.workdir import Rendezvous, trainer_argv

    meet = Rendezvous("10.0.0.5", 29611, nodes=3, node_rank=2)
    acc = trainer_argv(Settings(accelerate_launch=True), tmp_path / "spec.json", tmp_path, False, num_processes=2,
                       rendezvous=meet)
    flags = {k: acc[acc.index(k) + 1] for k in ("--num_processes", "--num_machines", "--machine_rank",
                                                  "--main_process_ip", "--main_process_port")}
    # accelerate counts the processes of every host; this host runs its 2 of the 6.
    assert flags == {"--num_processes": "6", "--num_machines": "3", "--machine_rank": "2",
                     "--main_process_ip": "10.0.0.5", "--main_process_port": "29611"}
    assert "--multi_gpu" in acc
    one = trainer_argv(Settings(accelerate_launch=True), tmp_path / "s", tmp_path, False, rendezvous=meet)
    assert "--multi_gpu" in one and one[one.index("--num_processes") + 1] == "3"  # one rank a host still meets
    tr = trainer_argv(Settings(accelerate_launch=False), tmp_path / "s", tmp_path, False, num_processes=2, rendezvous=meet)
    flags = {k: tr[tr.index(k) + 1] for k in ("--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port")}
    assert flags == {"--nproc_per_node": "2", "--nnodes": "3", "--node_rank": "2", "--master_addr": "10.0.0.5",
                     "--master_port": "29611"}


def test_trainer_env_sets_the_timeout_and_drops_bench_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings
    from worker.workdir import trainer_env

    monkeypatch.setenv("TUNEQ_RANDOM_INIT", "1")
    env = trainer_env(Settings(dist_timeout_s=90))
    assert env["TUNEQ_DIST_TIMEOUT_S"] == "90.0" and "TUNEQ_RANDOM_INIT" not in env


# --- random weights for benchmarks ----------------------------------------------------------


def tiny_config(directory: Path, **overrides) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **overrides)
    config.save_pretrained(directory)
    return directory


def test_random_init_only_for_a_config_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trainer.errors import ModelError
    from trainer.model import load_model, random_init_requested

    tiny_config(tmp_path)
    job = spec("full", model=str(tmp_path))
    assert not random_init_requested(str(tmp_path))  # off unless asked
    with pytest.raises(ModelError, match="cannot load"):
        load_model(job, "fp32", torch.device("cpu"))
    monkeypatch.setenv("TUNEQ_RANDOM_INIT", "1")
    model = load_model(job, "fp32", torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) > 0 and model.config.use_cache is False
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ModelError, match="holds weights"):
        load_model(job, "fp32", torch.device("cpu"))


# --- FSDP state across two CPU ranks ----------------------------------------------------------


def test_fsdp_checkpoint_resumes_across_ranks_and_exports_the_whole_model(tmp_path: Path) -> None:
    model_dir = tiny_config(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_port()), __file__, str(model_dir), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "out" / "result.json").read_text())
    # The resumed pair of ranks continues exactly where the saved one was.
    assert got["resumed_loss"] == pytest.approx(got["continued_loss"], rel=1e-6)
    assert got["resumed_loss"][0] != pytest.approx(got["fresh_loss"], rel=1e-3)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ck = tmp_path / "out" / "checkpoints" / "step-00000001"
    weights = load_file(str(ck / "model.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.weight"].shape == (64, 32), "whole tensors, not shards"
    optim = torch.load(ck / "optimizer.pt", weights_only=True)
    assert optim["state"], "the optimizer's moments are saved"
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    batch = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        loss = float(final(input_ids=batch, labels=batch).loss)
    assert loss == pytest.approx(got["final_loss"], rel=1e-5), "the export is the trained model"
    assert (tmp_path / "out" / "final" / "manifest.json").is_file()


def _port() -> int:
    from core.ports import free_port

    return free_port()


def _rank_main(model_dir: str, out: str) -> None:
    """One rank of the FSDP test (run by torch.distributed.run)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer import checkpoint as ckpt
    from trainer.distributed import gather_model_state, gather_training_state
    from trainer.events import EventWriter
    from trainer.export import export_final
    from trainer.spec import JobSpec
    from trainer.tiny import build_tokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(out)
    batch = torch.arange(16).reshape(2, 8) + rank  # each rank its own data, as in training

    def build(seed: int):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        return model, optimizer, scheduler

    def step(model, optimizer, scheduler) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / dist.get_world_size()

    model, optimizer, scheduler = build(0)
    step(model, optimizer, scheduler)
    full = gather_training_state(model, optimizer)
    assert full is not None
    if rank == 0:
        ckpt.save_checkpoint(out_dir, 1, model, optimizer, scheduler, {"train_state": {"step": 1}},
                             [ckpt.rng_state()] * 2, keep=2, full_state=full)
    dist.barrier()
    # Two steps: the second one depends on the restored AdamW moments and learning rate too.
    continued = [step(model, optimizer, scheduler) for _ in range(2)]

    fresh, fresh_opt, fresh_sched = build(1)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(out_dir), fresh, fresh_opt, fresh_sched, rank, torch.device("cpu"))
    resumed = [step(fresh, fresh_opt, fresh_sched) for _ in range(2)]
    other, other_opt, other_sched = build(1)
    untouched = step(other, other_opt, other_sched)

    whole = gather_model_state(fresh)
    with torch.no_grad():
        probe = torch.arange(16).reshape(2, 8)
        final_loss = float(fresh(input_ids=probe, labels=probe).loss)
    if rank == 0:
        job = JobSpec.model_validate({"model": model_dir, "method": "full", "training_file": "/t.jsonl"})
        with EventWriter(out_dir / "events.jsonl") as events:
            export_final(out_dir, fresh, build_tokenizer(), job, {}, events, "fp32", state_dict=whole)
        (out_dir / "result.json").write_text(json.dumps({
            "continued_loss": continued, "resumed_loss": resumed, "fresh_loss": untouched, "final_loss": final_loss}))
    dist.barrier()
    # Leave as `python -m trainer` does (trainer/__main__.py): gloo's and FSDP's C++ teardown aborted
    # a rank now and then on a loaded machine, after the result above was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _rank_main(sys.argv[1], sys.argv[2])

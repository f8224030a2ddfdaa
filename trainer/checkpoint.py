"""Resumable state: DIR/checkpoints/step-XXXXXXXX/.

  adapter_config.json + adapter_model.safetensors   (lora, qlora)   or   model.safetensors (full)
  optimizer.pt, scheduler.pt                        state dicts, loaded with weights_only=True
  rng.pt                                            python/numpy/torch/cuda RNG of every rank
  state.json                                        step, micro-batch position, epoch, token counts
  manifest.json                                     bytes and sha256 of every other file

A checkpoint is written into a temporary directory and renamed into place, so a trainer killed
while saving leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # weights_only loading accepts tensors and plain containers, not numpy arrays.
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_weights(model: Any, directory: Path) -> None:
    if _is_peft(model):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_model

        # save_model stores tied weights once and load_model re-ties them.
        save_model(model, str(directory / "model.safetensors"))


def load_weights(model: Any, directory: Path, device: torch.device) -> None:
    from safetensors.torch import load_file, load_model

    # Accelerate names a CPU rank's device "cpu:0", which safetensors refuses.
    target = "cpu" if device.type == "cpu" else str(device)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        state = load_file(str(directory / "adapter_model.safetensors"), device=target)
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {directory.name} does not fit this adapter: {result.unexpected_keys[:3]}")
    else:
        load_model(model, str(directory / "model.safetensors"), strict=True, device=target)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep: int,
    full_state: tuple[dict, dict] | None = None,
    protect: int | None = None,
) -> Path:
    """Write one checkpoint (rank 0 only) and delete all but the newest `keep` and the one of
    step `protect` (the best by export.metric, whose weights final/ may take).

    full_state: (model, optimizer) state dicts that every rank gathered for an FSDP-sharded
    model (trainer.distributed.gather_training_state); they are written in the one-GPU format.
    """
    final = checkpoint_path(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if full_state is not None:
        from safetensors.torch import save_file

        from trainer.distributed import unique_tensors

        save_file(unique_tensors(full_state[0]), str(tmp / "model.safetensors"))
        torch.save(full_state[1], tmp / "optimizer.pt")
    else:
        save_weights(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)  # a rerun without --resume reached the same step again
    tmp.rename(final)
    kept = checkpoint_path(out_dir, protect).name if protect is not None else None
    for old in list_checkpoints(out_dir)[:-keep]:
        if old.name != kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_manifest(directory: Path) -> None:
    # A downloaded checkpoint can be verified file by file, like final/.
    from trainer.export import MANIFEST, sha256_of

    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def load_checkpoint(
    directory: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int, device: torch.device
) -> dict[str, Any]:
    """Restore everything saved by save_checkpoint into live objects; returns state.json.

    Every rank calls it; an FSDP-sharded model is filled from rank 0's reading of the files.
    """
    from trainer.distributed import is_sharded, scatter_training_state

    if device.type == "cpu":
        # Accelerate names a CPU rank's device "cpu:0", which torch.load and safetensors refuse.
        device = torch.device("cpu")
    if is_sharded(model):
        from safetensors.torch import load_file

        # Only rank 0 reads: the broadcast fills every rank's shards, and k copies of an 8B
        # model's optimizer state in host memory would not fit.
        weights = load_file(str(directory / "model.safetensors")) if rank == 0 else {}
        optim = torch.load(directory / "optimizer.pt", weights_only=True) if rank == 0 else {}
        scatter_training_state(model, optimizer, weights, optim)
    else:
        load_weights(model, directory, device)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = torch.load(directory / "rng.pt", weights_only=True)
    set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return json.loads((directory / STATE_FILE).read_text())

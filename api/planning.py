"""The planner as the API uses it: one plan per job body, from the model's config.json alone.

The API host normally has no GPU, so what the plan is checked against comes from the worker
registry (the memory of the largest GPU a registered host has, in hosts with enough GPUs) or,
while no worker has registered its GPUs, from settings describing the worker hosts. The planner models the trainer as it runs
(trainer.planning.estimate_for_spec): bf16 mixed precision, the spec's full_precision, optimizer,
speed and strategy, the fast path's chunked loss and fused LoRA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import redis

from api.errors import APIError
from core import workers
from core.settings import Settings
from trainer import planning
from trainer.spec import METHODS

GiB = planning.GiB
# Decoder families whose layers the planner's activation model was derived from; for others the
# numbers are shown but a job is not refused on them.
CONFIDENT_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def _unmodelled(spec_like: dict[str, Any]) -> str | None:
    method = spec_like.get("method")
    if method not in (*METHODS, "auto"):
        return f"method {method!r} is not modelled by the planner; its fit is not checked"
    return None


def plan_memory_gib(gpus: int, settings: Settings) -> tuple[float, str]:
    """GiB per GPU a job's plan must fit, and where that number comes from: the largest GPU of a
    registered host with enough GPUs, else (no worker registered its GPUs' memory, or the registry
    is unreachable) TUNEQ_PLAN_GPU_MEMORY_GIB."""
    try:
        largest = workers.largest_gpu_memory(max(1, gpus))
    except redis.RedisError:
        largest = None
    if largest is not None:
        return largest, "registered_hosts"
    return settings.plan_gpu_memory_gib, "setting"


def make_plan(spec_like: dict[str, Any], model_path: str, gpus: int, settings: Settings,
              dataset_tokens: int | None = None) -> dict[str, Any] | None:
    """The plan of a JobSpec-shaped dict, as stored on the job and returned by the plan route.

    None when the model has no local config. `checked` says whether the plan may refuse the job.
    `min_gpu_memory_gib` is the least GPU memory the chosen method runs in (batch 1 when
    batch_size is "auto"): the workers run the job only on a host whose GPUs have that much.
    `gpus` counts the GPUs of each host; the spec's `nodes` hosts together run gpus x nodes ranks,
    planned as on one host (DDP for adapters, FSDP for full).
    """
    config = planning.local_config(model_path)
    if config is None:
        return None
    memory_gib, memory_source = plan_memory_gib(gpus, settings)
    nodes = int(spec_like.get("nodes") or 1)
    ranks = max(1, gpus) * nodes
    note = _unmodelled(spec_like)
    planned = dict(spec_like)
    if note is not None:
        # Still show what the modelled methods would need: that is the useful comparison.
        planned["method"] = "auto"
    try:
        p = planning.plan(
            planned, config, int(memory_gib * GiB), gpus=ranks, dataset_tokens=dataset_tokens,
            peak_tflops=settings.plan_gpu_tflops, gpu_model=settings.plan_gpu_model or None,
            liger=settings.plan_gpu_liger or None, warm_start=lambda method: warm_start(spec_like, method, model_path, settings),
        ).to_dict()
    except ValueError as exc:
        # Values the spec allows but this model does not (more checkpointed layers than it has).
        raise model_mismatch(str(exc), Path(model_path).name) from None
    confident = p["model"]["model_type"] in CONFIDENT_MODEL_TYPES
    if note is None and not confident:
        note = f"model type {p['model']['model_type']!r} is not a Llama-like decoder; the estimate is rough and not enforced"
    p["checked"] = note is None
    p["nodes"] = nodes
    p["notes"] = [note] if note else []
    p["available_gib"] = round(memory_gib, 3)
    p["gpu_memory_source"] = memory_source
    p["min_gpu_memory_gib"] = None
    if p["method"] is not None:
        need = planning.min_gpu_memory_bytes({**planned, "method": p["method"]}, config, ranks)
        p["min_gpu_memory_gib"] = math.ceil(need / GiB * 1000) / 1000
    for mp in p["methods"].values():
        mp["estimate"]["breakdown_gib"] = {
            k: round(mp["estimate"][k] / GiB, 3)
            for k in ("weights", "gradients", "optimizer_states", "activations", "logits", "overhead", "allocated", "total")
        }
    chosen = p["method"] or (spec_like.get("method") if spec_like.get("method") in METHODS else None)
    p["predicted_peak_gib"] = p["methods"][chosen]["estimate"]["total_gib"] if chosen in p["methods"] else None
    if p["compute"] is not None:
        p["compute"]["peak_tflops_per_gpu"] = p["compute"]["peak_flops_per_gpu"] / 1e12
        p["compute"]["gpu_model"] = settings.plan_gpu_model
    return p


def warm_start(spec_like: dict[str, Any], method: str, model_path: str, settings: Settings) -> bool:
    """Whether a one-process job of this method finds its trainer's imports done on the workers:
    a standby trainer takes any such job, the template one that needs no bitsandbytes."""
    from types import SimpleNamespace

    from trainer.startup import skip_unused_libraries

    if settings.standby_trainers > 0:
        return True
    job = SimpleNamespace(method=method, optimizer=spec_like.get("optimizer"), model=model_path)
    return settings.trainer_template and "bitsandbytes" in skip_unused_libraries(job, modules={})


# Where the planner's field names (its own, or the spec's) sit in a request body.
_PLANNER_FIELDS = {
    "freeze_layers": "method.freeze.trainable_layers", "freeze.trainable_layers": "method.freeze.trainable_layers",
    "lora_targets": "method.lora.target_modules", "lora.target_modules": "method.lora.target_modules",
    "quant_bits": "method.qlora.quantization.bits", "quantization.bits": "method.qlora.quantization.bits",
}


def model_mismatch(message: str, model: str) -> APIError:
    """400 naming the field of a value this model cannot take; the planner's message names it first."""
    head = message.split(":", 1)[0]
    named = head.replace("_", "").replace(".", "").isalnum()
    param = _PLANNER_FIELDS.get(head, head) if named else None
    if param and param != head:
        message = message.replace(head, param, 1)
    return APIError(400, f"{message} (model {model})", param=param, code="invalid_value")


def refuse_if_too_big(p: dict[str, Any] | None) -> None:
    """422 with the numbers when a checked plan says the job's own settings cannot fit."""
    if p is None or not p["checked"] or p["fits"]:
        return
    focus = p["requested_method"] if p["requested_method"] in p["methods"] else "qlora"
    need = p["methods"][focus]["estimate"]["total"]
    where = ("on the GPUs of any registered host (the largest has "
             f"{p['available_gib']:g} GiB)" if p.get("gpu_memory_source") == "registered_hosts" else "on its GPUs")
    raise APIError(
        422, f"the job does not fit {where}: {p['message']}", param="method", code="does_not_fit",
        extra={"predicted_gib": round(need / GiB, 3), "available_gib": p["available_gib"],
               "usable_gib": round(p["usable_bytes"] / GiB, 3), "gpus": p["gpus"], "suggestions": p["suggestions"]},
    )


def job_view(plan: dict[str, Any] | None, progress: dict[str, Any] | None, metrics: dict[str, Any] | None,
             min_gpu_memory_gib: float | None = None) -> dict[str, Any] | None:
    """The plan as the job object shows it: predicted beside measured peak memory, and the least
    GPU memory the workers place it by (raised above a GPU it ran out of memory on)."""
    measured = (progress or {}).get("peak_memory_bytes") or (metrics or {}).get("peak_memory_bytes")
    if plan is None and not measured:
        return None
    plan = plan or {}
    return {
        "method": plan.get("method"), "batch_size": plan.get("batch_size"), "fits": plan.get("fits"),
        "checked": plan.get("checked"), "notes": plan.get("notes", []),
        "gpu_memory_gib": plan.get("available_gib"), "min_gpu_memory_gib": min_gpu_memory_gib,
        "predicted_peak_gib": plan.get("predicted_peak_gib"),
        "measured_peak_gib": round(measured / GiB, 3) if measured else None,
    }


def tokens_of(report: dict[str, Any] | None) -> int | None:
    t = (report or {}).get("tokens")
    return int(t) if isinstance(t, int | float) and t > 0 else None


def to_json(p: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(p))  # JSON column: plain types only

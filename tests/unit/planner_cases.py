"""A broad grid of planner inputs whose outputs were recorded once, before the planner was split
into trainer/planning/, so that a refactor of the planner can be checked to the byte.

Each case is a JobSpec-shaped mapping (as the API hands the planner) with a model shape and the
keywords of plan() or estimate_for_spec(). `outcome` reduces a result to a digest of its full
to_dict() plus a few numbers that say where a difference is when the digest differs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

GiB = 1024**3


def llama(hidden, layers, heads, kv, ffn, vocab, tied) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn,
            "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": 4096}


MODELS = {
    "tiny": llama(64, 2, 4, 2, 128, 768, True),
    "1b": llama(2048, 16, 32, 8, 8192, 128_256, True),
    "8b": llama(4096, 32, 32, 8, 14_336, 128_256, False),
    "gpt2": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 1000, "n_positions": 512},
}

METHOD_FIELDS = {
    "full": {}, "lora": {}, "qlora": {}, "auto": {},
    "ia3": {}, "prefix": {}, "freeze": {"freeze": {"trainable_layers": 2}},
    "lora_dora": {"lora": {"use_dora": True, "r": 8}},
    "lora_dropout": {"lora": {"dropout": 0.1, "r": 32, "target_modules": ["q_proj", "v_proj"]}},
    "qlora8": {"quantization": {"bits": 8}},
    "ia3_custom": {"ia3": {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}},
    "prefix_proj": {"prefix": {"num_virtual_tokens": 32, "prefix_projection": True}},
    "freeze_emb": {"freeze": {"trainable_layers": 1, "train_embeddings": True}},
}


def _method(name: str) -> str:
    return name.split("_")[0].replace("qlora8", "qlora").replace("lora8", "lora")


def spec(method: str, batch: Any = 4, seq: int = 1024, speed: str | None = "auto", **extra: Any) -> dict[str, Any]:
    fields = METHOD_FIELDS[method]
    s: dict[str, Any] = {"model": "x", "method": "qlora" if method == "qlora8" else method.split("_")[0],
                         "hyperparameters": {"batch_size": batch, "max_seq_len": seq}, **fields}
    if speed is not None:
        s["speed"] = speed
    for k, v in extra.items():
        if k in ("max_grad_norm", "n_epochs", "max_steps", "gradient_accumulation_steps"):
            s["hyperparameters"][k] = v
        else:
            s[k] = v
    return s


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(kind: str, model: str, s: dict[str, Any], **kw: Any) -> None:
        out.append({"id": f"{len(out):04d}", "kind": kind, "model": model, "spec": s, "kw": kw})

    # plan(): every method and speed on three GPU sizes, a fixed and an automatic batch.
    for model, method, speed, batch, mem in itertools.product(
        ["1b", "8b"], list(METHOD_FIELDS), ["auto", "fast", "lean", "balanced"], [4, "auto"], [24, 80]
    ):
        if method.startswith("prefix") and speed in ("lean", "balanced"):
            continue
        if method.startswith("freeze") and model == "8b" and mem == 24:
            continue
        add("plan", model, spec(method, batch, 2048, speed), gpu_memory_bytes=mem * GiB, dataset_tokens=10**7)
    # Several GPUs, strategies, optimizers, offload, in-backward, precisions.
    for model, method, gpus, strategy in itertools.product(["1b", "8b"], ["full", "lora", "freeze", "auto"],
                                                           [2, 4], ["auto", "ddp", "fsdp"]):
        if strategy == "fsdp" and method not in ("full", "freeze"):
            continue
        add("plan", model, spec(method, 8, 4096, "auto", strategy=strategy), gpu_memory_bytes=40 * GiB, gpus=gpus,
            dataset_tokens=10**8)
    for model, optimizer, method, fp in itertools.product(
        ["1b", "tiny"], ["adamw", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"],
        ["full", "lora", "freeze"], ["fp32_master", "bf16"]
    ):
        add("plan", model, spec(method, "auto", 1024, "auto", optimizer=optimizer, full_precision=fp),
            gpu_memory_bytes=80 * GiB)
        add("est", model, spec(method, 2, 512, "lean", optimizer=optimizer, full_precision=fp))
    for model, method, speed, k, offload in itertools.product(
        ["1b"], ["full", "lora", "qlora"], ["lean", "balanced"], [None, 0, 3, 16], [False, True]
    ):
        if speed == "lean" and k is not None:
            continue
        if offload and speed == "balanced" and k == 0:
            continue
        extra = {"checkpoint_layers": k} if k is not None else {}
        add("plan", model, spec(method, 8, 4096, speed, checkpoint_offload=offload, **extra),
            gpu_memory_bytes=80 * GiB)
        add("est", model, spec(method, 8, 4096, speed, checkpoint_offload=offload, **extra))
    for model, method, speed, gpus in itertools.product(["1b", "8b"], ["full", "freeze", "lora", "ia3"],
                                                        ["lean", "fast", "auto"], [1, 2]):
        s = spec(method, 8, 2048, speed, optimizer_in_backward=True, max_grad_norm=0, full_precision="bf16")
        add("plan", model, s, gpu_memory_bytes=80 * GiB, gpus=gpus, dataset_tokens=10**6)
        if speed != "auto":
            add("est", model, s, gpus=gpus, strategy="fsdp" if gpus > 1 and method in ("full", "freeze") else "ddp")
    # Mappings as older callers write them: gradient_checkpointing instead of speed, fp32 precision,
    # accumulation, max_steps, epochs.
    for model, method, ckpt in itertools.product(["tiny", "1b", "gpt2"], ["auto", "full", "lora", "qlora"],
                                                 [False, True]):
        add("plan", model, spec(method, 4, 1024, None, gradient_checkpointing=ckpt, n_epochs=2),
            gpu_memory_bytes=24 * GiB, dataset_tokens=10**6)
        add("plan", model, spec(method, "auto", 512, None, gradient_checkpointing=ckpt, precision="fp32",
                                gradient_accumulation_steps=4, max_steps=100),
            gpu_memory_bytes=16 * GiB, dataset_tokens=10**6)
    # plan() keywords and estimate_for_spec() overrides.
    for model, method in itertools.product(["1b", "tiny"], ["full", "lora", "qlora", "auto"]):
        s = spec(method, 4, 2048, "auto")
        add("plan", model, s, gpu_memory_bytes=48 * GiB, margin=0.2, padded=False, autocast=False,
            loss_chunk_tokens=None, peak_tflops=400.0, efficiency=0.5, dataset_tokens=10**6)
        add("plan", model, s, gpu_memory_bytes=48 * GiB, optimizer="adamw_8bit", full_precision="bf16",
            strategy="ddp", loss_chunk_tokens=1024)
        concrete = "lora" if method == "auto" else method
        for kw in ({}, {"fast_path": False}, {"liger": True}, {"loss_chunk_tokens": None}, {"autocast": False},
                   {"padded": False}, {"seq_len": 300, "batch_size": 3}, {"speed": "lean"},
                   {"speed": "balanced", "checkpoint_layers": 1}, {"gpus": 2, "strategy": "ddp"}):
            add("est", model, spec(concrete, 4, 1024, "fast"), **kw)
    for model, method in itertools.product(["tiny", "1b", "gpt2"], list(METHOD_FIELDS)):
        if method == "auto":
            continue
        add("est", model, spec(method, 2, 256, "fast"))
        if not method.startswith("prefix"):
            add("est", model, spec(method, 2, 256, "lean"))
    # A dump of a validated JobSpec, as the worker hands it.
    from trainer.spec import JobSpec

    for method in ("full", "lora", "qlora"):
        # Without the fields added after the recording, which stay at their defaults (sft).
        dumped = {k: v for k, v in JobSpec(model="m", training_file="t", method=method).model_dump().items()
                  if k not in ("objective", "preference")}
        add("plan", "1b", dumped, gpu_memory_bytes=24 * GiB, dataset_tokens=10**6)
        add("est", "1b", dumped)
    return out


def digest(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


# The recording's planner had names of its own for optimizers; torch's AdamW, the spec's "adamw",
# was "adamw_torch" there. An estimate names the spec's optimizer now: compared under the old name.
RECORDED_OPTIMIZER_NAMES = {"adamw": "adamw_torch"}


def _as_recorded(estimate: dict[str, Any]) -> None:
    estimate["optimizer"] = RECORDED_OPTIMIZER_NAMES.get(estimate["optimizer"], estimate["optimizer"])


def outcome(kind: str, result: Any) -> dict[str, Any]:
    d = result.to_dict()
    for estimate in [mp["estimate"] for mp in d["methods"].values()] if kind == "plan" else [d]:
        _as_recorded(estimate)
    if kind == "plan":
        return {"digest": digest(d), "method": d["method"], "batch_size": d["batch_size"], "speed": d["speed"],
                "fits": d["fits"], "totals": {m: mp["estimate"]["total"] for m, mp in d["methods"].items()}}
    return {"digest": digest(d), "total": d["total"], "allocated": d["allocated"], "peak_at": d["peak_at"]}


def run(case: dict[str, Any], plan: Any, estimate_for_spec: Any) -> dict[str, Any]:
    """The case's outcome, or the error it raised (also part of the behaviour)."""
    config = MODELS[case["model"]]
    kw = dict(case["kw"])
    try:
        if case["kind"] == "plan":
            mem = kw.pop("gpu_memory_bytes")
            return outcome("plan", plan(case["spec"], config, mem, **kw))
        return outcome("est", estimate_for_spec(case["spec"], config, **kw))
    except (ValueError, TypeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}

"""DIR/final/: what a job produces, and manifest.json describing every file in it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from trainer.events import EventWriter, json_safe
from trainer.spec import JobSpec
from trainer.vocabulary import extra_files, with_files

FINAL = "final"
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_final(
    out_dir: Path, model: Any, tokenizer: Any, spec: JobSpec, metrics: dict[str, Any], events: EventWriter, precision: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the adapter (peft methods) or the whole model (full, freeze) with its tokenizer, and
    with export.merged the adapter merged into the base (final/merged/); rank 0 only.

    state_dict: the whole model of an FSDP-sharded run, gathered on rank 0 by every rank
    (trainer.distributed.gather_model_state); rank 0's own parameters are only its shards.
    """
    final = Path(out_dir) / FINAL
    final.mkdir(parents=True, exist_ok=True)
    detail = method_detail(model)
    if state_dict is not None:
        if precision == "bf16":
            state_dict = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.save_pretrained(final, state_dict=state_dict)
        if precision == "bf16":
            # save_pretrained names the dtype of the live (fp32 master) shards, not of what it wrote.
            model.config.dtype = "bfloat16"
            model.config.save_pretrained(final)
    else:
        if spec.method in ("full", "freeze") and precision == "bf16":
            # fp32 master weights served their purpose; users load and serve the model in bf16.
            model = model.to(torch.bfloat16)
        # A PeftModel saves only the adapter: adapter_config.json + adapter_model.safetensors.
        model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    _public_adapter_config(final, spec.model)
    if spec.export.merged:
        from trainer.merge import export_merged

        export_merged(spec.model, final, tokenizer, spec.export.merged_dtype)

    files = {}
    for path in sorted(p for p in final.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(final))] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {
        "format": "full-model" if spec.method in ("full", "freeze") else "peft-adapter",
        "base_model": public_name(spec.model),
        "method": spec.method,
        # What the trained model really was, read from it, not from the spec.
        "method_detail": detail,
        "merged": {"dir": "merged", "dtype": spec.export.merged_dtype, "into": "unquantized base"}
        if spec.export.merged else None,
        "created": time.time(),
        "spec": public_spec(spec),
        "metrics": json_safe(metrics),
        "files": files,
    }
    (final / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False, default=str))
    files[MANIFEST] = {"bytes": (final / MANIFEST).stat().st_size, "sha256": sha256_of(final / MANIFEST)}
    for name, info in files.items():
        events.emit("artifact", f"saved {FINAL}/{name}", path=f"{FINAL}/{name}", **info)
    return final


def public_name(value: str) -> str:
    """A path on the server becomes its last component; a hub id ("org/name") stays as it is.

    What a job exports is downloaded by users: it must not tell where the server keeps models,
    uploads or other jobs.
    """
    return Path(value).name if Path(value).is_absolute() else value


def public_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as manifest.json shows it: every path on the server reduced to a name."""
    out = spec.model_dump(mode="json")
    for key in ("model", "training_file", "validation_file", "init_from"):
        if isinstance(out.get(key), str):
            out[key] = public_name(out[key])
    return with_files(out, {param: public_name(path) for param, path, _ in extra_files(out)})


def _public_adapter_config(final: Path, model: str) -> None:
    # peft writes the base's path as loaded (a directory on the server) into adapter_config.json.
    path = final / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if isinstance(config.get("base_model_name_or_path"), str):
        config["base_model_name_or_path"] = public_name(config["base_model_name_or_path"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def method_detail(model: Any) -> dict[str, Any]:
    """peft type and options, quantized layer classes and trainable parameters of the live model."""
    quantized: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        # peft's adapter wrappers around them share the names; count bitsandbytes' layers only.
        if name in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes"):
            quantized[name] = quantized.get(name, 0) + 1
    detail: dict[str, Any] = {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "quantized_linears": quantized,
    }
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None:
        detail["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
        for key in ("r", "use_dora", "use_rslora", "num_virtual_tokens"):
            if hasattr(config, key):
                detail[key] = getattr(config, key)
    return detail

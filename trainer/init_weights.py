"""Continuing training: start from a previous job's adapter, model or checkpoint (spec.init_from).

Only the weights carry over. The optimizer and schedule start fresh: the new job has new data
and its own number of steps, and Adam's moments of the old data would push the first steps the
old way. A continued run is not a resume (that is --resume on the same work directory).

The directory may be a job's final/ (PEFT adapter, or a whole model of full/freeze) or one of its
checkpoints/step-N/ (adapter files or model.safetensors). The adapter must have the shape this
job builds (method, rank, target modules): a mismatch is a config error that names both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.spec import JobSpec

# peft's adapter_config.json peft_type per tuneq method.
PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING"}


def _adapter_mismatch(spec: JobSpec, saved: dict[str, Any]) -> str | None:
    want = PEFT_TYPES.get(spec.method)
    if saved.get("peft_type") != want:
        return f"it holds a {saved.get('peft_type')} adapter, this job trains {want} (method {spec.method!r})"
    if want == "LORA":
        lora = spec.lora
        if saved.get("r") != lora.r:
            return f"its LoRA rank is {saved.get('r')}, this job has lora.r={lora.r}"
        if bool(saved.get("use_dora")) != lora.use_dora:
            return f"its use_dora is {bool(saved.get('use_dora'))}, this job has {lora.use_dora}"
    if want == "PREFIX_TUNING":
        n = spec.prefix.num_virtual_tokens if spec.prefix else 16
        if saved.get("num_virtual_tokens") != n:
            return f"it has {saved.get('num_virtual_tokens')} virtual tokens, this job {n}"
    return None


def source_mismatch(spec: JobSpec, source: JobSpec) -> str | None:
    """Why a job of `spec` cannot start from what a job of `source` saved (None: it can).

    The check load_initial_weights makes on the saved files, made on the two specs, so that the
    API refuses such a job at creation instead of the job failing once it ran."""
    saved_type = PEFT_TYPES.get(source.method)
    wants_adapter = spec.method in PEFT_TYPES
    if saved_type is None:
        return None if not wants_adapter else (
            f"it saved a whole model (method {source.method!r}); method {spec.method!r} continues only from an adapter")
    if not wants_adapter:
        return f"it saved an adapter (method {source.method!r}); method {spec.method!r} continues only from a whole model"
    saved = {"peft_type": saved_type, "r": source.lora.r, "use_dora": source.lora.use_dora,
             "num_virtual_tokens": source.prefix.num_virtual_tokens if source.prefix else 16}
    return _adapter_mismatch(spec, saved)


def _shown(src: Path) -> str:
    # The job's own folder and below: a user reads these messages, the host's layout is not theirs.
    return "/".join(src.parts[-2:])


def load_initial_weights(model: Any, spec: JobSpec) -> None:
    """Copy spec.init_from's weights into `model` (a PeftModel for adapter methods)."""
    if spec.init_from is None:
        return
    src = Path(spec.init_from)
    if not src.is_dir():
        raise ConfigError(f"init_from: {_shown(src)} is not a directory of a previous job's weights")
    adapter_cfg = src / "adapter_config.json"
    if hasattr(model, "peft_config"):
        if not adapter_cfg.is_file():
            raise ConfigError(f"init_from: {_shown(src)} holds no adapter (adapter_config.json); method {spec.method!r} needs one")
        problem = _adapter_mismatch(spec, json.loads(adapter_cfg.read_text()))
        if problem:
            raise ConfigError(f"init_from: cannot continue from {src.name}: {problem}")
        _load_adapter(model, src)
    else:
        if adapter_cfg.is_file():
            raise ConfigError(f"init_from: {_shown(src)} holds an adapter; method {spec.method!r} continues only from a whole model")
        _load_model(model, src)


def _load_adapter(model: Any, src: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"init_from: {_shown(src)} has no adapter_model.safetensors")
    device = next(p.device for p in model.parameters())
    try:
        result = set_peft_model_state_dict(model, load_file(str(weights), device=str(device)))
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"init_from: the adapter in {src.name} does not fit this model: {exc}") from exc
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(
            f"init_from: the adapter in {src.name} has weights this job's adapter lacks "
            f"(e.g. {result.unexpected_keys[0]}); use the same target modules"
        )


def _load_model(model: Any, src: Path) -> None:
    import torch
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"init_from: {_shown(src)} has no model weights (*.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    own = model.state_dict()
    # A bf16 export continues in the dtype this run trains in (fp32 master weights).
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    # Tied output embeddings are stored once; every other missing weight means a different model.
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise ConfigError(f"init_from: the model in {src.name} is not this base model's shape (e.g. {example})")
    if tied:
        model.tie_weights()

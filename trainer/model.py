"""Loading the base model and tokenizer, and choosing the numeric precision.

The loading code is the real one (`from_pretrained` on a local directory or a hub id); no
machine here reaches a hub, so tests pass directories that `trainer.tiny` built. Remote code is
never run unless an admin listed the model in TUNEQ_TRUST_REMOTE_CODE_MODELS: a job spec must not
be a way to execute someone's Python on a shared GPU server, so the spec has no such switch. Weights
load only from safetensors, which holds tensors and nothing executable (a pickle can run code).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.errors import ConfigError, ModelError
from trainer.spec import JobSpec


def quiet_libraries() -> None:
    """Progress bars and info logs of the libraries would flood trainer.log with every run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft calls a transformers API that 5.x deprecates; the user can do nothing about it.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def resolve_precision(requested: str, device: torch.device) -> str:
    """'bf16' or 'fp32' for this device; a forced bf16 on a GPU without it fails before loading."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise ConfigError(
                f"precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; allowed: auto, fp32"
            )
        if requested == "auto":
            return "bf16" if supported else "fp32"
        return requested
    # CPUs compute bf16 through autocast, slowly; only on request.
    return "fp32" if requested == "auto" else requested


def _check_source(name: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model: {name} has no config.json; it is not a model directory")
    elif name.startswith(("/", ".", "~")):
        raise ModelError(f"model: directory {name} does not exist")


def remote_code_allowed(name: str) -> bool:
    """True only for a model the service's admin listed (hub id or absolute directory)."""
    raw = os.environ.get("TUNEQ_TRUST_REMOTE_CODE_MODELS", "").strip()
    try:
        listed = json.loads(raw) if raw else []
    except ValueError:
        return False
    if not isinstance(listed, list):
        return False
    allowed = {str(Path(e).resolve()) if str(e).startswith("/") else str(e) for e in listed if isinstance(e, str) and e}
    return (str(Path(name).resolve()) if name.startswith("/") else name) in allowed


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    _check_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=remote_code_allowed(name))
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, missing files: all mean "bad model"
        raise ModelError(f"model: cannot load the tokenizer of {name}: {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model: the tokenizer of {name} has no EOS token; the model could not learn to stop")
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id will do; EOS always exists.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: JobSpec, precision: str, device: torch.device) -> Any:
    """The base model as the method needs it, before any adapter is attached."""
    from transformers import AutoModelForCausalLM

    from trainer.methods import quantization_config

    _check_source(spec.model)
    # Frozen weights stay in bf16 on a GPU: upcasting a frozen 8B base to fp32 would double its
    # memory for no gain. Full fine-tuning keeps fp32 master weights and computes in bf16 autocast,
    # unless full_precision "bf16" asks for bf16 weights, gradients and AdamW state throughout.
    if precision == "bf16" and (spec.method not in ("full", "freeze") or spec.full_precision == "bf16"):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": "sdpa",
        "trust_remote_code": remote_code_allowed(spec.model),
        "use_safetensors": True,
    }
    if device.type == "cuda":
        # Straight onto this rank's GPU; bitsandbytes also needs it to quantize on load.
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    if spec.method == "qlora":
        kwargs["quantization_config"] = quantization_config(precision, spec.quantization)
    if random_init_requested(spec.model):
        return _random_model(spec, dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: cannot load {spec.model}: {exc}") from exc
    # The KV cache is for generation; in training it only costs memory.
    model.config.use_cache = False
    return model


# Benchmarks only: full-size shapes with random weights, built where they train. Writing and
# reading 16 GB of random safetensors for an 8B shape costs minutes and measures nothing.
RANDOM_INIT_ENV = "TUNEQ_RANDOM_INIT"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def random_init_requested(name: str) -> bool:
    """TUNEQ_RANDOM_INIT=1 and a config-only model directory; a directory with weights is refused,
    so that the switch can never silently replace real weights (the worker also strips it)."""
    if os.environ.get(RANDOM_INIT_ENV, "") != "1":
        return False
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelError(f"model: {RANDOM_INIT_ENV}=1 needs a local model directory with a config.json; {name} is not one")
    if any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelError(
            f"model: {RANDOM_INIT_ENV}=1 initialises random weights only for a config-only directory; {name} holds weights"
        )
    return True


def _random_model(spec: JobSpec, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.method == "qlora":
        raise ModelError(f"model: {RANDOM_INIT_ENV}=1 cannot build a quantized base; use lora or full")
    config = AutoConfig.from_pretrained(spec.model)
    # Created on the device itself: an 8B shape initialises in seconds on a GPU.
    with torch.device(device if device.type == "cuda" else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total); a 4-bit parameter stores two weights per byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total

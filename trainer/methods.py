"""Fine-tuning methods: which weights train, and how the frozen ones are stored.

full: every weight trains. lora: low-rank adapters on the linear layers, base frozen.
qlora: lora over a base quantized to 4-bit NF4 (bitsandbytes), which fits a base about four
times larger in the same memory.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.spec import JobSpec


def quantization_config(precision: str) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("method: qlora needs the bitsandbytes package; use lora or install it") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        # Quantizing the quantization constants saves ~0.4 bit per weight at no quality cost.
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
    )


def enable_gradient_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing works with frozen inputs and DDP; the reentrant variant would
    # silently produce no gradients for adapters when the embedding output needs none.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_method(model: Any, spec: JobSpec) -> Any:
    """The model with exactly the method's parameters trainable."""
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if spec.gradient_checkpointing:
        # With a frozen embedding nothing before the first checkpointed block needs a gradient;
        # making the input require one keeps the recomputed graph connected.
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {exc}") from exc

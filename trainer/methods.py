"""Fine-tuning methods: which weights train, and how the frozen ones are stored.

full: every weight trains. freeze: only the top N decoder layers (and the final norm) train;
the lower layers hold general features that a small task rarely needs to change.
lora: low-rank adapters on the linear layers, base frozen; DoRA and rsLoRA are LoRA options.
qlora: lora over a base quantized by bitsandbytes, to 4-bit NF4 (about four times less memory
than bf16) or to 8-bit LLM.int8() (half, and closer to the bf16 base's outputs).
ia3: learned rescaling vectors on keys, values and the MLP input (~0.01 % of the weights).
prefix: learned key/value positions prepended to every layer's attention.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.spec import JobSpec


def quantization_config(precision: str, settings: Any = None) -> Any:
    """bitsandbytes settings of a qlora base; `settings` is spec.quantization (None: 4-bit NF4)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("method: qlora needs the bitsandbytes package; use lora or install it") from exc
    from transformers import BitsAndBytesConfig

    bits = settings.bits if settings is not None else 4
    if bits == 8:
        # int8 matmuls cast their inputs to fp16 by design; the warning repeats on every call.
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type if settings is not None else "nf4",
        # Quantizing the quantization constants saves ~0.4 bit per weight at no quality cost.
        bnb_4bit_use_double_quant=settings.double_quant if settings is not None else True,
        bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
    )


def enable_gradient_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing works with frozen inputs and DDP; the reentrant variant would
    # silently produce no gradients for adapters when the embedding output needs none.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def peft_config(spec: JobSpec) -> Any:
    """The peft config of an adapter method."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    if spec.method in ("lora", "qlora"):
        lora = spec.lora
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
    if spec.method == "ia3":
        ia3 = spec.ia3
        kwargs = {}
        if ia3 is not None and ia3.target_modules:
            kwargs["target_modules"] = ia3.target_modules
            # peft requires the feed-forward ones to be named whenever targets are.
            kwargs["feedforward_modules"] = ia3.feedforward_modules or []
        return IA3Config(task_type="CAUSAL_LM", **kwargs)
    if spec.method == "prefix":
        prefix = spec.prefix
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix.num_virtual_tokens if prefix else 16,
            prefix_projection=prefix.prefix_projection if prefix else False,
        )
    raise ValueError(f"method {spec.method!r} has no peft config")


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers of a causal LM (Llama, Mistral, Qwen, Gemma, ...)."""
    inner = getattr(model, "model", None)
    for owner in (inner, getattr(inner, "decoder", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError("method: freeze needs a decoder with a `layers` list; use full or lora for this model")


def freeze_all_but_top(model: Any, trainable_layers: int, train_embeddings: bool) -> None:
    layers = decoder_layers(model)
    if trainable_layers > len(layers):
        raise ConfigError(
            f"freeze.trainable_layers: {trainable_layers} exceeds the model's {len(layers)} decoder layers; "
            f"allowed 1..{len(layers)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    # The final norm scales what the top layer writes; leaving it frozen would fight the update.
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    if train_embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(True)


def apply_method(model: Any, spec: JobSpec, checkpointing: bool | None = None) -> Any:
    """The model with exactly the method's parameters trainable, started from spec.init_from.

    checkpointing: gradient checkpointing as resolved from spec.speed (None: spec.gradient_checkpointing).
    """
    from trainer.init_weights import load_initial_weights
    from trainer.modules import check_against_model, modules_of_model

    if checkpointing is None:
        checkpointing = bool(spec.gradient_checkpointing)
    if checkpointing:
        enable_gradient_checkpointing(model)
    check_against_model(spec, modules_of_model(model))
    if spec.method in ("full", "freeze"):
        for p in model.parameters():
            p.requires_grad_(True)
        if spec.method == "freeze":
            freeze_all_but_top(model, spec.freeze.trainable_layers, spec.freeze.train_embeddings)
            if checkpointing:
                model.enable_input_require_grads()
        load_initial_weights(model, spec)
        return model

    from peft import get_peft_model

    config = peft_config(spec)
    if checkpointing:
        # With a frozen embedding nothing before the first checkpointed block needs a gradient;
        # making the input require one keeps the recomputed graph connected.
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"{'lora' if spec.method in ('lora', 'qlora') else spec.method}.target_modules: {exc}") from exc
    load_initial_weights(peft_model, spec)
    return peft_model

"""Settings of the methods beyond plain LoRA, the optimizer and the export, and their checks.

They are part of trainer.spec.JobSpec; they live here so that the spec module stays readable.
Every check that needs only the spec is here; the one that needs the model's module names
(target modules) is trainer.modules.check_targets, run by the API on a meta-device model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainer.vocabulary import OPTIMIZERS, ExportSelect, Optimizer  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from trainer.spec import JobSpec


# Methods that train a peft adapter on a frozen base, and those of them that can be merged.
ADAPTER_METHODS = ("lora", "qlora", "ia3", "prefix")
MERGEABLE_METHODS = ("lora", "qlora", "ia3")


class StrictModel(BaseModel):
    # strict: JSON true is not the number 1, nor "3" the number 3; a typo must not train.
    # allow_inf_nan: a NaN learning rate is named as what it is, not as "above the maximum".
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class QuantizationSettings(StrictModel):
    bits: Literal[4, 8] = Field(4, description="4: NF4/FP4 base (QLoRA); 8: LLM.int8() base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Also quantize the 4-bit scales (~0.4 bit per weight saved).")


class IA3Settings(StrictModel):
    target_modules: list[str] | None = Field(
        None, description="Modules whose activations are rescaled (default: peft's k_proj, v_proj, down_proj)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Those of target_modules whose input (not output) is rescaled (default: down_proj)."
    )


class PrefixSettings(StrictModel):
    num_virtual_tokens: int = Field(16, ge=1, le=512, description="Trained key/value positions per layer.")
    prefix_projection: bool = Field(False, description="Reparametrise the prefix through a small MLP.")


class FreezeSettings(StrictModel):
    trainable_layers: int = Field(
        ..., ge=1, le=1024, description="Decoder layers that train, counted from the top; all below stay frozen."
    )
    train_embeddings: bool = Field(False, description="Also train the input embedding (and a tied LM head).")


class ExportSettings(StrictModel):
    merged: bool = Field(False, description="Also write the adapter merged into the base model (final/merged/).")
    merged_dtype: Literal["bf16", "fp32"] = Field("bf16", description="Dtype of the merged model's weights.")
    select: ExportSelect = Field(
        "last", description="last: final/ holds the last step's weights; best: those of the checkpoint (or the end) "
        "with the highest eval score `metric` (the earliest of equal ones). Needs an eval block.",
    )
    metric: str | None = Field(
        None, min_length=1, max_length=32,
        description="select best: the name of the eval grader whose score picks the weights (default: the first).",
    )


def _name_list_ok(field: str, names: list[str] | None) -> None:
    if names is None:
        return
    if not names:
        raise ValueError(f"{field}: give at least one module name or leave it out")
    for name in names:
        if not name or not name.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"{field}: {name!r} is not a module name (letters, digits, '_' and '.')")


def check_method_settings(spec: JobSpec) -> None:
    """Settings given for a method the job does not use, and combinations that cannot work."""
    used = {
        "quantization": spec.method == "qlora",
        "ia3": spec.method == "ia3",
        "prefix": spec.method == "prefix",
        "freeze": spec.method == "freeze",
    }
    for name, applies in used.items():
        value = getattr(spec, name)
        if not applies and value is not None:
            owner = "qlora" if name == "quantization" else name
            raise ValueError(f"{name}: these settings apply to method {owner!r}, not {spec.method!r}")
    if spec.method == "freeze" and spec.freeze is None:
        raise ValueError("freeze.trainable_layers: required with method 'freeze' (decoder layers that train, from the top)")
    if spec.method == "ia3":
        _name_list_ok("ia3.target_modules", spec.ia3.target_modules if spec.ia3 else None)
        _name_list_ok("ia3.feedforward_modules", spec.ia3.feedforward_modules if spec.ia3 else None)
        if spec.ia3 and spec.ia3.feedforward_modules:
            if spec.ia3.target_modules is None:
                raise ValueError("ia3.feedforward_modules: give ia3.target_modules too; they must include these")
            extra = sorted(set(spec.ia3.feedforward_modules) - set(spec.ia3.target_modules))
            if extra:
                raise ValueError(f"ia3.feedforward_modules: {extra} are not in ia3.target_modules")
    lora = spec.lora
    if spec.method not in ("lora", "qlora") and (lora.use_dora or lora.use_rslora or lora.loraplus_lr_ratio is not None):
        raise ValueError("lora: use_dora, use_rslora and loraplus_lr_ratio apply to method 'lora' or 'qlora'")
    if spec.export.merged and spec.method not in MERGEABLE_METHODS:
        why = ("prefix tuning adds key/value positions, there are no weights to merge into"
               if spec.method == "prefix" else f"method {spec.method!r} already produces a whole model")
        raise ValueError(f"export.merged: only for {', '.join(MERGEABLE_METHODS)}; {why}")
    if spec.method == "prefix" and spec.packing:
        # peft hands the prefix to the model as a key/value cache, and transformers builds the
        # block-diagonal mask of packed rows only without one: packed examples would see each other.
        raise ValueError("packing: not supported with method 'prefix' (its virtual tokens arrive as a key/value "
                         "cache, which turns off the mask that keeps packed examples apart); give packing false")
    if spec.method == "prefix" and spec.gradient_checkpointing:
        raise ValueError("gradient_checkpointing: not supported with method 'prefix' (its past key/values bypass it)")

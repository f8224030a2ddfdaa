"""JobSpec: the one definition of a fine-tuning job.

Everything that reaches a GPU passes through this model first, so every check that can fail
without loading weights lives here and names the field and its allowed range. The closed sets of
values its fields take (Method, Speed, ...) are in trainer.vocabulary, importable from here too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from trainer.eval_settings import EvalSettings, check_eval_settings
from trainer.integration_settings import MAX_INTEGRATIONS, Integration, check_integrations
from trainer.method_settings import (
    ExportSettings,
    FreezeSettings,
    IA3Settings,
    PrefixSettings,
    QuantizationSettings,
    StrictModel,
    check_method_settings,
)
# The field types, importable from here: one definition, in trainer/vocabulary.py.
from trainer.vocabulary import (  # noqa: F401 - re-exported
    DATA_FORMATS,
    DEFAULT_METHOD,
    FULL_PRECISIONS,
    MAX_NODES,
    METHOD_SETTINGS,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    SPEEDS,
    AUTO_BETA,
    OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    SIMPO_GAMMA_BETA_RATIO,
    STRATEGIES,
    TORCH_OPTIMIZERS,
    WHOLE_WEIGHT_METHODS,
    DataFormat,
    FullPrecision,
    Method,
    Objective,
    Optimizer,
    Precision,
    Speed,
    Strategy,
)

# Linear projections of Llama-shaped decoders; "all-linear" lets peft find them on any model.
ALL_LINEAR = "all-linear"


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ALL_LINEAR, description="Module names to adapt, or 'all-linear'."
    )
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its LoRA direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r), which keeps high ranks learning.")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1.0, le=1024.0, description="LoRA+: the B matrices learn at this multiple of the learning rate."
    )

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraSettings:
        if isinstance(self.target_modules, list):
            if not self.target_modules:
                raise ValueError("lora.target_modules: give at least one module name or 'all-linear'")
            for name in self.target_modules:
                if not name or not name.replace("_", "").replace(".", "").isalnum():
                    raise ValueError(
                        f"lora.target_modules: {name!r} is not a module name "
                        "(letters, digits, '_' and '.')"
                    )
        return self


class PreferenceSettings(StrictModel):
    """The preference objectives' settings; requests give them in method.<objective>.hyperparameters."""

    beta: Annotated[float, Field(gt=0, le=1000)] | Literal["auto"] = Field(
        "auto",
        description="dpo: how far from the reference the policy may move (smaller: further); simpo: the reward "
        "scale; orpo: the weight of the odds-ratio term. auto: " + ", ".join(f"{k} {v:g}" for k, v in AUTO_BETA.items()) + ".",
    )
    gamma: Annotated[float, Field(ge=0, le=1000)] | None = Field(
        None, description=f"simpo only: the target reward margin (default: {SIMPO_GAMMA_BETA_RATIO:g} x beta).",
    )


class Hyperparameters(StrictModel):
    n_epochs: int = Field(1, ge=1, le=100, description="Passes over the training file.")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Optimizer steps; overrides n_epochs when set."
    )
    learning_rate: float = Field(2e-4, ge=1e-9, le=1.0, description="Peak learning rate of AdamW.")
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per micro-batch (per GPU).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(1024, ge=8, le=262_144, description="Tokens per example; longer ones are truncated.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="Fraction of steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, le=10_000_000, description="Warm-up steps; overrides warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="Clip gradients to this norm; 0 disables.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of data order, init and dropout.")


class Schedule(StrictModel):
    log_every_steps: int = Field(1, ge=1, le=1_000_000, description="Steps between metric events.")
    eval_every_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Steps between validation passes (default: at the end only)."
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Steps between checkpoints (default: none until the end)."
    )
    checkpoint_every_minutes: float | None = Field(
        None, gt=0, le=10_080, description="Also checkpoint when this many minutes passed since the last one."
    )
    checkpoint_every_epoch: bool | None = Field(
        None,
        description="Also checkpoint at the end of each epoch, as OpenAI's jobs do (null: when the run is counted "
        "in epochs, that is without hyperparameters.max_steps).",
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Newest checkpoints kept on disk.")
    eval_examples: int = Field(
        256, ge=1, le=1_000_000,
        description="Validation examples of the periodic pass (valid_*); the pass at the end (full_valid_*) uses all.",
    )


class MixSource(StrictModel):
    file: str = Field(..., min_length=1, description="Path of a JSONL file of replay or general data (any format).")
    weight: float = Field(
        ..., gt=0, le=100,
        description="Examples of this file per example of the training file in the mixed data (0.25: one in five is replay).",
    )


class JobSpec(StrictModel):
    """What to train, on what, and how."""

    model: str = Field(..., min_length=1, max_length=512, description="Hub id or local directory of the base model.")
    method: Method = Field(DEFAULT_METHOD, description=" | ".join(METHODS) + ".")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Used by lora and qlora.")
    quantization: QuantizationSettings | None = Field(None, description="qlora's base: 4-bit (default) or 8-bit.")
    ia3: IA3Settings | None = Field(None, description="Used by ia3.")
    prefix: PrefixSettings | None = Field(None, description="Used by prefix.")
    freeze: FreezeSettings | None = Field(None, description="Used by freeze (required there).")
    optimizer: Optimizer = Field("adamw", description=" | ".join(OPTIMIZERS) + ".")
    init_from: str | None = Field(
        None, min_length=1, description="Adapter, model or checkpoint directory whose weights this job starts from."
    )
    export: ExportSettings = Field(default_factory=ExportSettings, description="What final/ holds besides the adapter.")
    training_file: str = Field(..., min_length=1, description="Path of the training JSONL.")
    validation_file: str | None = Field(None, description="Path of the validation JSONL.")
    data_format: DataFormat = Field(
        "auto", description="Format of the training and validation files; auto detects it from the first example."
    )
    train_on_inputs: bool | None = Field(
        None, description="Also train on prompts and system/user turns (default: false, true for raw text)."
    )
    packing: bool = Field(
        False, description="Pack short examples into rows of max_seq_len; batch_size then counts rows."
    )
    mix: list[MixSource] = Field(
        default_factory=list, max_length=16, description="Replay or general data mixed into training at a weight."
    )
    forgetting_file: str | None = Field(
        None, description="General held-out JSONL; its loss and perplexity before and after training measure forgetting."
    )
    eval: EvalSettings | None = Field(
        None, description="Held-out prompts with expected answers: the model answers them at every checkpoint and at "
        "the end, and graders score the answers (eval_<grader> metrics).",
    )
    objective: Objective = Field(
        "sft",
        description=" | ".join(OBJECTIVES) + ". sft: learn the assistant's tokens; dpo, simpo, orpo: learn to prefer "
        "each line's preferred_output over its non_preferred_output (preference data).",
    )
    preference: PreferenceSettings | None = Field(None, description="Used by dpo, simpo and orpo.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    schedule: Schedule = Field(default_factory=Schedule)
    precision: Precision = Field("auto", description="auto: bf16 on a GPU that supports it, else fp32.")
    speed: Speed = Field(
        "auto",
        description="lean: gradient checkpointing (recompute activations in backward, least memory); fast: no "
        "checkpointing (about a third less compute); balanced: checkpoint only the bottom checkpoint_layers "
        "decoder layers; auto: fast when it fits the GPU, else the fewest checkpointed layers that fit, else lean.",
    )
    checkpoint_layers: int | None = Field(
        None, ge=0, le=4096,
        description="speed balanced: how many decoder layers, from the bottom, are checkpointed (null: the fewest "
        "that fit the GPU, by the planner's estimate). Giving it with speed auto means balanced.",
    )
    checkpoint_offload: bool = Field(
        False,
        description="The checkpointed layers' inputs wait in pinned CPU memory between forward and backward: "
        "saves about seq_len x batch_size x hidden x 2 bytes of GPU memory per checkpointed layer, costs PCIe "
        "copies that overlap compute. Needs checkpointed layers: speed lean, or balanced with checkpoint_layers "
        "above 0 (or null).",
    )
    optimizer_in_backward: bool = Field(
        False,
        description="Update each decoder layer's weights as soon as backward has produced their gradients, and free "
        "those gradients at once, instead of holding every gradient until the optimizer step: saves about the "
        "decoder layers' gradient bytes of peak memory (a third of full fine-tuning's static memory in bf16). "
        "Needs hyperparameters.max_grad_norm 0 (clipping needs every gradient before any update), "
        "gradient_accumulation_steps 1, optimizer adamw or adamw_fused, and one GPU.",
    )
    gradient_checkpointing: bool | None = Field(
        None, description="The old name of the speed choice: true is speed lean, false is fast; null: as speed says."
    )
    full_precision: FullPrecision = Field(
        "fp32_master",
        description="full and freeze with bf16 precision: fp32_master keeps fp32 weights and AdamW state and "
        "computes in bf16 autocast; bf16 keeps weights, gradients and AdamW state in bf16 (half the memory, "
        "small updates can round away). Adapter methods always keep the frozen base in bf16.",
    )
    strategy: Strategy = Field(
        "auto",
        description="How several GPUs share the job: ddp (each holds the model) or fsdp (weights, gradients and "
        "optimizer state sharded; full and freeze only); auto: fsdp for full fine-tuning on several GPUs, else ddp.",
    )
    nodes: int = Field(
        1, ge=1, le=MAX_NODES,
        description="Hosts the job spans; gpus counts the GPUs of each host, so it runs nodes x gpus ranks with one "
        "global batch. Above 1: DDP for adapter methods, FSDP for full and freeze (strategy auto), across the hosts.",
    )
    suffix: str | None = Field(None, max_length=64, description="Added to the fine-tuned model's name.")
    integrations: list[Integration] = Field(
        default_factory=list, max_length=MAX_INTEGRATIONS,
        description="OpenAI's integrations: {'type': 'wandb', 'wandb': {'project', 'name', 'entity', 'tags'}} "
        "writes the job's curves as an offline Weights & Biases run, published as the artifact wandb.tar.gz "
        "(upload it with `wandb sync`).",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        hp = self.hyperparameters
        # Compared with the defaults, not with "was it given", so that a dumped spec validates again.
        if self.method not in ("lora", "qlora") and self.lora != LoraSettings():
            raise ValueError(f"lora: LoRA settings apply to method 'lora' or 'qlora', not {self.method!r}")
        self._speed_from_checkpointing()
        self._offload_needs_checkpointing()
        self._in_backward_rules()
        self._preference_rules()
        check_method_settings(self)
        check_eval_settings(self)
        check_integrations(self.integrations)
        if self.strategy == "fsdp" and self.eval is not None:
            raise ValueError("eval: answers are generated on each GPU's whole model, which strategy 'fsdp' shards; "
                             "give strategy 'ddp' (or 'auto' with one GPU) or leave eval out")
        if self.strategy == "fsdp" and self.method not in ("full", "freeze"):
            raise ValueError(
                f"strategy: fsdp shards full fine-tuning (method 'full' or 'freeze'), not {self.method!r}; "
                "adapter methods train with 'ddp' or 'auto'"
            )
        if hp.warmup_steps is not None and hp.max_steps is not None and hp.warmup_steps > hp.max_steps:
            raise ValueError(
                f"hyperparameters.warmup_steps: {hp.warmup_steps} exceeds max_steps {hp.max_steps}; "
                f"allowed 0..{hp.max_steps}"
            )
        # ASCII only: a Cyrillic 'а' posing as a Latin 'a' would make a model name that reads like another's.
        if self.suffix is not None and not all((c.isascii() and c.isalnum()) or c in "-_" for c in self.suffix):
            raise ValueError("suffix: ASCII letters, digits, '-' and '_' only")
        return self

    def _speed_from_checkpointing(self) -> None:
        # One choice under two names: after validation both say the same (null while speed is auto
        # or balanced, which is neither all layers checkpointed nor none).
        if self.checkpoint_layers is not None:
            if self.speed == "auto":
                self.speed = "balanced"
            if self.speed != "balanced":
                raise ValueError(f"checkpoint_layers: applies to speed 'balanced' (or 'auto'), not {self.speed!r}")
            if self.gradient_checkpointing is not None:
                raise ValueError("gradient_checkpointing: give speed 'balanced' with checkpoint_layers, not both")
        if self.speed == "balanced":
            if self.gradient_checkpointing is not None:
                raise ValueError("gradient_checkpointing: speed 'balanced' checkpoints some layers; give only speed")
            if self.method == "prefix":
                raise ValueError("speed: 'balanced' checkpoints activations, which method 'prefix' does not support; "
                                 "allowed: fast, auto")
            return
        ckpt = self.gradient_checkpointing
        if ckpt is not None:
            implied = "lean" if ckpt else "fast"
            if self.speed not in ("auto", implied):
                raise ValueError(
                    f"gradient_checkpointing: {str(ckpt).lower()} means speed {implied!r}, but speed is {self.speed!r}; "
                    "give only speed"
                )
            self.speed = implied
        elif self.speed != "auto":
            self.gradient_checkpointing = self.speed == "lean"
        if self.method == "prefix" and self.speed == "lean" and not ckpt:
            raise ValueError("speed: 'lean' checkpoints activations, which method 'prefix' does not support; "
                             "allowed: fast, auto")

    def _offload_needs_checkpointing(self) -> None:
        # After _speed_from_checkpointing: gradient_checkpointing true is lean by now, and a
        # checkpoint_layers count with speed auto is balanced.
        if not self.checkpoint_offload:
            return
        if self.speed == "balanced" and self.checkpoint_layers == 0:
            raise ValueError("checkpoint_offload: checkpoint_layers 0 checkpoints no layer, so there is nothing to "
                             "offload; give checkpoint_layers above 0, speed 'lean', or checkpoint_offload false")
        if self.speed not in ("lean", "balanced"):
            raise ValueError(f"checkpoint_offload: offloads the inputs of checkpointed layers, which speed "
                             f"{self.speed!r} may not have; give speed 'lean' or 'balanced', or checkpoint_offload false")

    def _in_backward_rules(self) -> None:
        if not self.optimizer_in_backward:
            return
        hp = self.hyperparameters
        if hp.max_grad_norm > 0:
            raise ValueError(f"optimizer_in_backward: updates layers before the whole gradient exists, so it cannot clip "
                             f"to its norm; give hyperparameters.max_grad_norm 0 (now {hp.max_grad_norm:g}) or "
                             "optimizer_in_backward false")
        if hp.gradient_accumulation_steps != 1:
            raise ValueError(f"optimizer_in_backward: updates after every backward, so it cannot accumulate "
                             f"{hp.gradient_accumulation_steps} micro-batches; give gradient_accumulation_steps 1")
        if self.optimizer not in TORCH_OPTIMIZERS:
            raise ValueError(f"optimizer_in_backward: works with optimizer 'adamw' or 'adamw_fused', not "
                             f"{self.optimizer!r}")
        if self.strategy == "fsdp":
            raise ValueError("optimizer_in_backward: runs on one GPU; strategy 'fsdp' shards over several")

    def _preference_rules(self) -> None:
        if self.objective not in PREFERENCE_OBJECTIVES:
            if self.preference is not None:
                raise ValueError(f"preference: these settings apply to objective {', '.join(PREFERENCE_OBJECTIVES)}, "
                                 f"not {self.objective!r}")
            if self.data_format == "preference":
                raise ValueError("data_format: 'preference' data trains a preference objective (dpo, simpo or orpo), "
                                 f"not {self.objective!r}")
            return
        if self.preference is None:
            self.preference = PreferenceSettings()
        if self.preference.gamma is not None and self.objective != "simpo":
            raise ValueError(f"preference.gamma: applies to objective 'simpo', not {self.objective!r}")
        if self.data_format not in ("auto", "preference"):
            raise ValueError(f"data_format: objective {self.objective!r} trains on 'preference' lines, not "
                             f"{self.data_format!r}")
        # Each pair is scored whole: packing would mix the two outputs' rows with other pairs.
        for name, given in (("packing", self.packing), ("train_on_inputs", bool(self.train_on_inputs)),
                            ("mix", bool(self.mix))):
            if given:
                raise ValueError(f"{name}: not used with objective {self.objective!r}, which compares whole "
                                 "outputs of preference pairs; leave it out")
        if self.optimizer_in_backward:
            raise ValueError(f"optimizer_in_backward: not used with objective {self.objective!r}")
        if self.objective == "dpo" and self.strategy == "fsdp":
            raise ValueError("strategy: DPO keeps a whole frozen copy of the model as its reference, which sharded "
                             "training (fsdp) does not; give strategy 'ddp', or objective simpo or orpo")

    @property
    def is_preference(self) -> bool:
        return self.objective in PREFERENCE_OBJECTIVES

    def beta(self) -> float:
        """The preference objective's beta, "auto" resolved (trainer.vocabulary.AUTO_BETA)."""
        given = self.preference.beta if self.preference is not None else "auto"
        return AUTO_BETA[self.objective] if given == "auto" else float(given)

    def gamma(self) -> float:
        """SimPO's target margin, its default resolved."""
        given = self.preference.gamma if self.preference is not None else None
        return SIMPO_GAMMA_BETA_RATIO * self.beta() if given is None else float(given)

    def effective_batch(self) -> int:
        return self.hyperparameters.batch_size * self.hyperparameters.gradient_accumulation_steps

    def ranks(self, gpus: int) -> int:
        """Training processes of the job when it asks for `gpus` GPUs on each of its nodes."""
        return self.nodes * gpus

"""What a memory estimate is asked about (MemoryInputs) and the step it implies (Step).

MemoryInputs is one training setting in the spec's own terms: its method settings are the spec's
models (trainer.spec), so a default lives in one place. Step derives, once, everything the
estimate's parts share: dtypes, which layers are checkpointed, what trains, the LoRA layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.planning.shape import Shape
from trainer.spec import (
    METHODS,
    OPTIMIZERS,
    TORCH_OPTIMIZERS,
    WHOLE_WEIGHT_METHODS,
    FreezeSettings,
    FullPrecision,
    IA3Settings,
    LoraSettings,
    Method,
    Optimizer,
    Precision,
    PrefixSettings,
    QuantizationSettings,
    Strategy,
)


@dataclass(frozen=True)
class MemoryInputs:
    """One training micro-step on one GPU, as the estimate needs it (see trainer.planning.memory).

    padded: batches carry a padding mask (the trainer pads to the longest example), which makes
    transformers repeat k/v heads and torch keep a float attention bias per layer.
    autocast: the step runs under accelerate's bf16 mixed precision (autocast forward, its cache of
    bf16 weight copies, fp32 outputs); fp32-master full fine-tuning always assumes it.
    loss_chunk_tokens: the trainer's chunked linear cross-entropy with chunks of this many tokens;
    None is the whole-batch loss. fused_lora: the trainer's fused LoRA layers; liger: liger's
    RMSNorm, RoPE and SwiGLU kernels replace the model's.
    checkpoint_layers: only the bottom k of the L decoder layers are checkpointed (speed
    balanced); None: all when gradient_checkpointing, else none.
    checkpoint_offload: the checkpointed layers' inputs wait in host memory (trainer.offload).
    optimizer_in_backward: each decoder layer's AdamW step runs in backward and frees its gradients
    (trainer/optim_in_backward.py); one GPU, torch AdamW, no accumulation.
    strategy: how several GPUs share the job, resolved ("ddp" or "fsdp"); FSDP always checkpoints.
    fragmentation: the allocator's share above the allocated peak; None: as measured.
    """

    method: Method
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None
    checkpoint_offload: bool = False
    optimizer_in_backward: bool = False
    optimizer: Optimizer = "adamw"
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    ia3: IA3Settings = field(default_factory=IA3Settings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    freeze: FreezeSettings | None = None
    gpus: int = 1
    strategy: Strategy = "ddp"
    full_precision: FullPrecision = "bf16"
    precision: Precision = "bf16"
    gradient_accumulation_steps: int = 1
    padded: bool = True
    autocast: bool = False
    loss_chunk_tokens: int | None = None
    fused_lora: bool = False
    liger: bool = False
    fragmentation: float | None = None
    # DPO with a whole-weight method holds a frozen copy of the model as its reference (trainer.preference),
    # in the activations' dtype; batch_size then counts rows, two per preference pair.
    reference_model: bool = False

    @property
    def sharded(self) -> bool:
        return self.gpus > 1 and self.strategy == "fsdp"

    @property
    def freeze_layers(self) -> int | None:
        return self.freeze.trainable_layers if self.freeze is not None else None

    def check(self, shape: Shape) -> None:
        """What the trainer refuses has no plan: ValueError naming the setting."""
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.batch_size < 1 or self.seq_len < 1 or self.gpus < 1:
            raise ValueError("batch_size, seq_len and gpus must be at least 1")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy: {self.strategy!r} is not 'ddp' or 'fsdp'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.quantization.bits not in (4, 8):
            raise ValueError(f"quantization.bits: {self.quantization.bits} is not 4 or 8")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ValueError("loss_chunk_tokens must be at least 1")
        if self.optimizer_in_backward and (self.gpus > 1 or self.gradient_accumulation_steps > 1
                                           or self.optimizer not in TORCH_OPTIMIZERS):
            raise ValueError(
                "optimizer_in_backward: runs on one GPU with torch AdamW and gradient_accumulation_steps 1, "
                f"not gpus {self.gpus}, optimizer {self.optimizer!r}, gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}")
        layers = self.freeze_layers
        if self.method == "freeze" and not (layers and 1 <= layers <= shape.layers):
            raise ValueError(f"freeze.trainable_layers: {layers} is outside 1..{shape.layers}")
        if self.sharded and self.method not in WHOLE_WEIGHT_METHODS:
            raise ValueError(f"strategy: fsdp is planned for full and freeze; {self.method} runs DDP over several GPUs")
        k = self.checkpoint_layers
        if k is not None and not 0 <= k <= shape.layers:
            raise ValueError(f"checkpoint_layers: {k} is outside 0..{shape.layers}")


@dataclass(frozen=True)
class LoraLayers:
    """The LoRA layers as the step runs them."""

    r: int
    dropout: float
    adapter_bytes: int  # peft upcasts bf16 adapters to fp32
    modules: frozenset[str]
    # peft's bnb Linear4bit skips the fp32 input cast under autocast; its plain Linear does not,
    # and the trainer's fused layers save the shared bf16 input as the 4-bit layer does.
    quantized: bool = False
    use_dora: bool = False


@dataclass(frozen=True)
class Step:
    """The micro-step the inputs imply, with every choice the parts of the estimate share."""

    inputs: MemoryInputs
    shape: Shape
    checkpointed_layers: int  # from the bottom; 0 is fast, all layers lean
    act_bytes: int  # activations and frozen weights: 2 (bf16) or 4 (fp32)
    residual_bytes: int  # the residual stream: fp32 under fp32-master autocast
    whole: bool  # full or freeze: whole weights train
    fp32_master: bool
    casts: bool  # autocast casts fp32 trained weights to bf16 (fp32 master, not sharded)
    autocast: bool
    lora: LoraLayers | None
    fused_lora: bool  # the trainer's fused LoRA layers (and its fused LoRA MLP) run
    padded: bool  # prefix tuning always masks: peft extends the mask by the virtual tokens
    prefix_tokens: int  # virtual tokens in front of every row (prefix tuning), else 0
    chunk: int | None  # the chunked loss's tokens per chunk; None: the whole-batch loss
    norm_trains: bool
    head_trains: bool

    @property
    def checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    @property
    def tokens(self) -> int:
        return self.inputs.batch_size * self.inputs.seq_len

    @property
    def lora_autocast(self) -> bool:
        """LoRA's inputs are cast to bf16 by autocast (not with fp32 activations)."""
        return self.autocast and self.act_bytes == 2


def resolve(shape: Shape, x: MemoryInputs, notes: list[str]) -> Step:
    x.check(shape)
    layers = shape.layers
    checkpointing = x.gradient_checkpointing
    if x.sharded and not checkpointing:
        checkpointing = True
        notes.append("FSDP checkpoints activations whatever the speed (trainer/distributed.py)")
    checkpointed = x.checkpoint_layers
    if x.sharded or checkpointed is None:
        checkpointed = layers if checkpointing else 0

    act_bytes = 4 if x.precision == "fp32" else 2
    whole = x.method in WHOLE_WEIGHT_METHODS
    fp32_master = whole and x.full_precision == "fp32_master" and x.precision != "fp32"
    # FSDP's mixed precision casts the parameters to bf16 as it gathers them: no autocast cache,
    # and the residual stream is bf16.
    casts = fp32_master and not x.sharded
    lora = None
    fused = False
    if x.method in ("lora", "qlora"):
        settings = x.lora
        modules = frozenset(shape.lora_targets(settings.target_modules))
        if not modules:
            raise ValueError(f"lora_targets: {settings.target_modules!r} matches no module of this model")
        eight_bit = x.method == "qlora" and x.quantization.bits == 8
        # The fused layer applies to plain LoRA on a bf16 or 4-bit base; peft's own forward otherwise.
        fused = x.fused_lora and settings.dropout == 0 and not settings.use_dora and not eight_bit
        four_bit = x.method == "qlora" and x.quantization.bits == 4
        lora = LoraLayers(r=settings.r, dropout=settings.dropout, adapter_bytes=4, modules=modules,
                          quantized=four_bit or fused, use_dora=settings.use_dora)
    prefix_tokens = x.prefix.num_virtual_tokens if x.method == "prefix" else 0
    train_embeddings = x.freeze is not None and x.freeze.train_embeddings
    return Step(
        inputs=x,
        shape=shape,
        checkpointed_layers=checkpointed,
        act_bytes=act_bytes,
        residual_bytes=4 if casts else act_bytes,
        whole=whole,
        fp32_master=fp32_master,
        casts=casts,
        autocast=x.autocast or fp32_master,
        lora=lora,
        fused_lora=fused,
        padded=x.padded or x.method == "prefix",
        prefix_tokens=prefix_tokens,
        chunk=None if x.sharded else x.loss_chunk_tokens,  # FSDP's head is sharded: the plain loss
        norm_trains=whole,
        head_trains=x.method == "full" or (x.method == "freeze" and train_embeddings and shape.tied),
    )

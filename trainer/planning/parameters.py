"""Parameters: how many train under each method, and the bytes of weights, gradients and
optimizer states they take per GPU.

The frozen base is bf16, NF4 (QLoRA, double quantisation) or int8 (8-bit QLoRA, with its fp32
row scales); trained weights are in their dtype (fp32 master, bf16, fp32 adapters: peft upcasts
them). Gradients: one per trainable parameter, in the parameter's dtype. Optimizer: AdamW's m and
v, as each optimizer of trainer.optim allocates them: torch's AdamW (fused or not) `zeros_like(p)`,
so the parameters' dtype; bitsandbytes' 8-bit states take 2 B/param; the paged ones live in CUDA
unified memory outside torch's allocator (counted as resident on the GPU, not in `allocated`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from trainer.planning.inputs import LoraLayers, Step
from trainer.planning.shape import Linear, Shape, layer_suffix, lora_linear_params
from trainer.spec import TORCH_OPTIMIZERS

# NF4 with double quantisation: 4 bits per weight, one 8-bit absmax per block of 64 weights,
# one fp32 scale per 256 absmax blocks, plus a 256-entry fp32 code table per quantised tensor.
NF4_BLOCK = 64
NF4_BLOCKS_PER_SCALE = 256
NF4_CODE_BYTES = 256 * 4 + 16 * 4
# peft's IA3 targets for Llama-shaped decoders, and those of them whose input is scaled.
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_DEFAULT_FEEDFORWARD = ("down_proj",)


def lora_params(shape: Shape, lora: LoraLayers) -> int:
    per_layer = shape.adapted_features(lora.modules).values()
    n = sum(lora_linear_params(lora.r, io, out, lora.use_dora) for io, out in per_layer)
    n += sum(lora.r * (num + dim) for name, num, dim in shape.embeddings if name in lora.modules)
    return n


def quantized_bytes(shape: Shape, bits: int, base_bytes: int) -> tuple[int, int]:
    """(bytes of the quantised decoder linears, their parameter count). bitsandbytes quantises
    every decoder linear; embeddings, the LM head and norms stay bf16."""
    return shape.memo(("quantized_bytes", bits, base_bytes), lambda: _quantized_bytes(shape, bits, base_bytes))


def _quantized_bytes(shape: Shape, bits: int, base_bytes: int) -> tuple[int, int]:
    quant = quantized = 0
    for m in shape.linears:
        if m.layer is None:
            continue
        n = m.in_features * m.out_features
        quantized += n
        if bits == 8:
            # LLM.int8(): one byte per weight and one fp32 scale per output row (SCB).
            quant += n + 4 * m.out_features
        else:
            blocks = math.ceil(n / NF4_BLOCK)
            quant += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCKS_PER_SCALE) + NF4_CODE_BYTES
        if m.bias:
            quant += m.out_features * base_bytes
    return quant, quantized


def decoder_linears_named(shape: Shape, names: Sequence[str]) -> list[Linear]:
    """Decoder linears whose name is one of `names` or ends with '.' + one of them."""
    names = tuple(names)
    return list(shape.memo(("decoder_linears_named", names), lambda: tuple(
        m for m in shape.linears
        if m.layer is not None and any(m.name == w or m.name.endswith("." + w) for w in names))))


def ia3_feedforward(targets: Sequence[str] | None,
                    feedforward: Sequence[str] | None) -> tuple[tuple[str, ...], set[str]]:
    """peft's IA3 defaults: its targets, and down_proj as the feed-forward one only with them."""
    chosen = tuple(targets or IA3_DEFAULT_TARGETS)
    if feedforward is not None:
        return chosen, set(feedforward)
    return chosen, set(IA3_DEFAULT_FEEDFORWARD if chosen == IA3_DEFAULT_TARGETS else ())


def ia3_vectors(shape: Shape, targets: Sequence[str] | None = None,
                feedforward: Sequence[str] | None = None) -> list[tuple[Linear, int]]:
    """peft IA3: one scale per output feature of a target, per input feature of a feed-forward one."""
    chosen, ff = ia3_feedforward(targets, feedforward)
    return [(m, m.in_features if layer_suffix(m.name).rsplit(".", 1)[-1] in ff else m.out_features)
            for m in decoder_linears_named(shape, chosen)]


def ia3_params(shape: Shape, targets: Sequence[str] | None = None, feedforward: Sequence[str] | None = None) -> int:
    return sum(n for _, n in ia3_vectors(shape, targets, feedforward))


def prefix_params(shape: Shape, tokens: int = 16, projection: bool = False) -> int:
    """peft prefix tuning: a key and a value row of kv_heads x head_dim per layer and virtual
    token; with the projection, an embedding of one row per token and a two-layer MLP."""
    token_dim = shape.kv_heads * shape.head_dim
    out = shape.layers * 2 * token_dim
    if not projection:
        return tokens * out
    return tokens * token_dim + (token_dim * token_dim + token_dim) + (token_dim * out + out)


def freeze_trainable_params(shape: Shape, trainable_layers: int, train_embeddings: bool = False) -> int:
    """freeze: the top layers, the final norm and optionally the input embedding (and a tied head)."""
    return trainable_layers * shape.layer_params + shape.hidden + (shape.embedding_params if train_embeddings else 0)


def trainable_per_layer(step: Step) -> dict[int, int]:
    """Trainable parameters per decoder layer: the buckets optimizer_in_backward steps in backward.
    Those outside the layers (embeddings, head, final norm, prefix tuning's encoder) are not here:
    they wait for optimizer.step() after backward."""
    shape, x = step.shape, step.inputs
    if x.method == "full":
        return dict.fromkeys(range(shape.layers), shape.layer_params)
    if x.method == "freeze":
        return dict.fromkeys(range(shape.layers - (x.freeze_layers or 0), shape.layers), shape.layer_params)
    per: dict[int, int] = {}
    if step.lora is not None:
        for layer, (io, out) in shape.adapted_features(step.lora.modules).items():
            if layer is not None:
                per[layer] = lora_linear_params(step.lora.r, io, out, step.lora.use_dora)
    elif x.method == "ia3":
        for m, n in ia3_vectors(shape, x.ia3.target_modules, x.ia3.feedforward_modules):
            per[m.layer] = per.get(m.layer, 0) + n
    return per


@dataclass(frozen=True)
class ParameterMemory:
    """Bytes per GPU of the weights, all gradients and the optimizer states, after sharding."""

    trainable: int
    param_bytes: int  # of a trained parameter
    grad_bytes: int
    weights: int
    weight_parts: dict[str, int]
    gradients: int  # all of them, as at the end of backward
    optimizer_states: int
    paged: bool  # the states live outside torch's allocator
    ddp_buckets: int = 0  # DDP's copy of the gradients for its all-reduce
    fsdp_unit_gradient: int = 0  # one FSDP unit's unsharded gradient before its reduce-scatter
    notes: list[str] = field(default_factory=list)


# Bytes of AdamW's m and v per trained parameter of `param_bytes` bytes, by trainer.optim's name.
def _state_bytes(optimizer: str, param_bytes: int) -> int:
    return {"adamw": 2 * param_bytes, "adamw_fused": 2 * param_bytes, "adamw_8bit": 2,
            "paged_adamw": 8, "paged_adamw_8bit": 2}[optimizer]


def _trained_and_weights(step: Step) -> tuple[int, int, dict[str, int]]:
    """(trainable parameters, a trained parameter's bytes, the weights' bytes by part)."""
    shape, x = step.shape, step.inputs
    if step.whole:
        param_bytes = 4 if (step.fp32_master or x.precision == "fp32") else 2
        if x.method == "full":
            trainable = shape.total_params
        else:
            trainable = freeze_trainable_params(shape, x.freeze_layers, x.freeze.train_embeddings)
        return trainable, param_bytes, {"base_weights": shape.total_params * param_bytes}
    a = step.act_bytes
    if x.method == "qlora":
        bits = x.quantization.bits
        quant, quantized = quantized_bytes(shape, bits, a)
        biases = sum(m.out_features for m in shape.linears if m.layer is not None and m.bias)
        parts = {"nf4_linears" if bits == 4 else "int8_linears": quant,
                 "bf16_rest": (shape.total_params - quantized - biases) * a}
    else:
        parts = {"base_weights": shape.total_params * a}
    if step.lora is not None:
        trainable = lora_params(shape, step.lora)
    elif x.method == "ia3":
        trainable = ia3_params(shape, x.ia3.target_modules, x.ia3.feedforward_modules)
    else:
        trainable = prefix_params(shape, x.prefix.num_virtual_tokens, x.prefix.prefix_projection)
    parts["adapters"] = trainable * 4  # peft keeps adapters in fp32
    return trainable, 4, parts


def parameter_memory(step: Step) -> ParameterMemory:
    x, shape = step.inputs, step.shape
    trainable, param_bytes, parts = _trained_and_weights(step)
    weights = sum(parts.values())
    grads = trainable * param_bytes
    states = trainable * _state_bytes(x.optimizer, param_bytes)
    paged = x.optimizer.startswith("paged_")
    notes = []
    if paged:
        notes.append("paged optimizer states live in unified memory outside torch's allocator: counted in total, "
                     "not in allocated; under pressure the driver moves them to host memory")
    if x.optimizer in TORCH_OPTIMIZERS and step.whole and param_bytes == 2:
        notes.append("torch AdamW keeps m and v in the parameters' dtype: bf16 here")
    base = ParameterMemory(trainable=trainable, param_bytes=param_bytes, grad_bytes=param_bytes, weights=weights,
                           weight_parts=parts, gradients=grads, optimizer_states=states, paged=paged, notes=notes)
    if x.sharded:
        return _fsdp_sharded(shape, x.gpus, base)
    if x.gpus > 1:
        # DDP copies gradients into its all-reduce buckets (gradient_as_bucket_view is off).
        notes.append(f"DDP over {x.gpus} GPUs: every GPU holds the whole model plus gradient buckets")
        return replace(base, ddp_buckets=trainable * param_bytes)
    return base


def _fsdp_sharded(shape: Shape, gpus: int, p: ParameterMemory) -> ParameterMemory:
    """FSDP full shard: the sharded master copy, with bf16 copies gathered for the root unit
    (embedding, head, final norm: gathered through the whole step) and for one layer plus the
    prefetched next."""
    root = shape.embedding_params + shape.lm_head_params + shape.hidden
    gathered = 2 * root + 2 * 2 * shape.layer_params
    notes = [*p.notes, f"FSDP full shard over {gpus} GPUs: weights, gradients and optimizer divided by {gpus}"]
    return replace(
        p,
        weights=math.ceil(p.weights / gpus) + gathered,
        weight_parts={**p.weight_parts, "fsdp_gathered_units": gathered},
        gradients=math.ceil(p.gradients / gpus),
        optimizer_states=math.ceil(p.optimizer_states / gpus),
        # A unit's unsharded bf16 gradient and its fp32 copy for the reduction exist until it is
        # reduce-scattered.
        fsdp_unit_gradient=(2 + 4) * max(shape.layer_params, root),
        notes=notes,
    )

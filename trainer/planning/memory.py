"""Peak GPU memory of one training micro-step, per GPU, in bytes.

The trainer modelled is `python -m trainer run` (trainer/loop.py under accelerate): bf16 mixed
precision through accelerate, which runs the forward under bf16 autocast and converts the
model's outputs to fp32; full and freeze load fp32 master weights (or bf16 weights with
full_precision="bf16"); adapter methods keep a bf16 base and fp32 adapters.

The parts: weights, gradients and optimizer states (trainer.planning.parameters); activations,
logits and autocast's weight cache (trainer.planning.activations); small buffers (ids, labels,
rotary tables, masks, cuBLAS workspace, NF4/int8 dequantisation scratch, DoRA's weight-norm
scratch) and allocator fragmentation (here).

Peak memory is the largest of five moments of a micro-step: the end of the forward (all saved
activations plus autocast's cache of bf16 weight copies), the loss's forward, the start of
backward (all saved activations plus the loss's backward buffers, few gradients yet, because
zero_grad(set_to_none) freed them), the top decoder layer's backward (every stored activation
or checkpointed input still held, that layer recomputed when checkpointed, and its gradient
buffers; the loss's buffers freed) and the end of backward (all gradients, one layer's
activations). With checkpoint_offload only the resident checkpointed inputs count at the top
layer's backward: the others wait in host memory. Between them memory moves roughly linearly layer by layer, so the peak is at one of
them. With optimizer_in_backward each decoder layer's gradients are freed by its AdamW step as
soon as they are complete, so the end of backward holds only the gradients outside the layers and
one layer's.

`allocated` is what torch.cuda.max_memory_allocated reports; `total` adds fragmentation (and paged
optimizer states) and is what must fit. The CUDA context (~0.5 GiB) is outside both; the fit
margin absorbs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from trainer.planning.activations import ActivationMemory, activation_memory, autocast_cache, loss_memory
from trainer.planning.inputs import MemoryInputs, Step, resolve
from trainer.planning.parameters import ParameterMemory, parameter_memory, trainable_per_layer
from trainer.planning.shape import GiB, Shape, gib, shape_of

# The caching allocator rounds and splits blocks, so reserved memory (what hits the OOM) runs
# above the allocated peak. On the H200 (bench/results/plan_accuracy.md) reserved/allocated was
# 1.00-1.10 for most cells, 1.15 for QLoRA at batch 4, and 1.06-1.26 for full fine-tuning with
# checkpointing, whose recomputed layers interleave with growing gradients.
DEFAULT_FRAGMENTATION = 0.10
FULL_CHECKPOINTED_FRAGMENTATION = 0.15
# cuBLAS/cuBLASLt workspaces and other small library buffers that go through the allocator.
LIBRARY_WORKSPACE_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak GPU memory of one training step, per GPU, in bytes.

    weights + gradients + optimizer + activations + logits + overhead == total. The gradient,
    activation and logits terms are those alive at the peak moment (`peak_at`); `parts` itemises
    every term, including the ones that are not at their largest at the peak.
    """

    method: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    gpus: int
    strategy: str
    full_precision: str
    trainable_params: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    overhead: int
    allocated: int  # what torch.cuda.max_memory_allocated should report
    total: int  # allocated plus fragmentation and paged optimizer states: what has to fit
    peak_at: str  # "forward_end", "loss_forward", "backward_start", "layer_backward" or "backward_end"
    parts: dict[str, int]
    notes: list[str]
    speed: str = "fast"  # fast, lean or balanced (0 < checkpoint_layers < layers)
    loss: str = "whole"  # "whole" or "chunked(<tokens>)"
    checkpoint_layers: int = 0  # decoder layers checkpointed, from the bottom

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_gib"] = round(self.total / GiB, 3)
        d["allocated_gib"] = round(self.allocated / GiB, 3)
        return d


def small_buffers(step: Step) -> int:
    shape, x, tokens, act_bytes = step.shape, step.inputs, step.tokens, step.act_bytes
    small = 2 * 8 * tokens  # input ids and labels (int64)
    small += 2 * 8 * tokens  # shifted labels and the padded copy in the loss
    small += 2 * act_bytes * shape.head_dim * tokens  # rotary cos/sin, shared by all layers
    if step.padded:
        small += x.batch_size * x.seq_len * (x.seq_len + step.prefix_tokens)  # bool 4D mask
    small += LIBRARY_WORKSPACE_BYTES
    largest, widest_in = shape.largest_decoder_matmul, shape.widest_decoder_input
    if x.method == "qlora" and x.quantization.bits == 4:
        # bitsandbytes dequantises one weight to bf16 per matmul, forward and backward.
        small += 2 * act_bytes * largest
    elif x.method == "qlora":
        # int8 matmul: the fp16 copy and int8 quantisation of its input, and the weight
        # dequantised to fp16 for the input gradient.
        small += 2 * largest + 3 * widest_in * tokens
    if step.lora is not None and step.lora.use_dora:
        # DoRA recomputes ‖W + BA‖ every forward: W+BA and B@A as fp32 matrices, plus peft's
        # identity of the input width (in x in) for the LoRA weight.
        small += 3 * 4 * largest + 4 * widest_in * widest_in
    return small


@dataclass(frozen=True)
class Peak:
    at: str
    gradients: int
    activations: int
    logits: int
    freed_in_backward: int  # gradients optimizer_in_backward never holds


def peak(step: Step, params: ParameterMemory, acts: ActivationMemory, loss: dict[str, int],
         notes: list[str]) -> Peak:
    """The largest of the four moments of a micro-step (see the module docstring)."""
    shape, x, tokens = step.shape, step.inputs, step.tokens
    cache = autocast_cache(step, params.trainable)
    grads = params.gradients
    # With accumulation the gradients live through every micro-step.
    grads_always = grads if x.gradient_accumulation_steps > 1 else 0
    # Tied full fine-tuning: the LM head's and the embedding's grads meet in one buffer at the end.
    tied_both = step.head_trains and shape.tied and not x.sharded
    tie_transient = shape.vocab * shape.hidden * params.grad_bytes if tied_both else 0
    forward_acts = acts.stored + acts.head + cache.forward
    start_acts = acts.stored + acts.head + cache.saved
    last_layer = 0 if step.checkpointing else acts.layer_bytes_per_token * tokens
    end_acts = acts.recompute + acts.transient + cache.recompute + last_layer
    end_grads = grads + tie_transient + params.fsdp_unit_gradient
    # At the top layer's backward: the head's gradient (made by the loss) and that layer's.
    top_layer = max(trainable_per_layer(step).values(), default=0) * params.grad_bytes
    head_grad = shape.vocab * shape.hidden * params.grad_bytes if step.head_trains else 0
    layer_grads = grads_always or min(grads, head_grad + top_layer)
    freed = 0
    if x.optimizer_in_backward:
        per_layer = trainable_per_layer(step)
        one_layer = max(per_layer.values(), default=0) * params.grad_bytes
        freed = sum(per_layer.values()) * params.grad_bytes - one_layer
        # Only the layer being finished keeps its gradients; layer 0's step has freed them before the
        # embedding's backward runs (autograd runs AccumulateGrad first), so the tied embedding's
        # second gradient never meets them: the larger of the two, not both.
        end_grads = grads - freed - one_layer + max(one_layer, tie_transient)
        notes.append(f"optimizer_in_backward: each decoder layer's AdamW step frees its gradients in backward, "
                     f"{gib(freed)} of gradients never held (at most one layer's, {gib(one_layer)}, at once)")
    moments = [
        # the model's forward ends: autocast's cache still holds every cast weight
        ("forward_end", grads_always, forward_acts, loss["model_out"]),
        # the loss's own forward (the chunk loop, or the fp32 copies of the whole logits)
        ("loss_forward", grads_always, start_acts, loss["forward"]),
        ("backward_start", grads_always, start_acts, loss["peak"]),
        # the top decoder layer's backward: everything stored, that layer whole again, its gradients
        ("layer_backward", layer_grads, acts.stored + acts.recompute + acts.transient + cache.recompute,
         loss["kept"]),
        ("backward_end", end_grads, end_acts, loss["kept"]),
    ]
    at, live_grads, live_acts, live_logits = max(moments, key=lambda m: m[1] + m[2] + m[3])
    return Peak(at, live_grads, live_acts, live_logits, freed)


def _fragmentation(step: Step, allocated: int, params: ParameterMemory) -> int:
    x, layers, checkpointed = step.inputs, step.shape.layers, step.checkpointed_layers
    share = x.fragmentation
    if share is None:
        # Measured at k = L; any k > 0 ends its backward recomputing bottom layers between the
        # grown gradients, which is where that fragmentation comes from.
        share = FULL_CHECKPOINTED_FRAGMENTATION if step.whole and checkpointed > 0 else DEFAULT_FRAGMENTATION
    frag = int(allocated * share)
    if step.whole and 0 < checkpointed < layers and x.fragmentation is None:
        # Checkpointing a layer never costs memory: the checkpointed-run fragmentation must not
        # outweigh the one layer saved (fp32 master weights inflate it past that).
        fast_total = estimate(step.shape, replace(x, checkpoint_layers=0)).total
        paged = params.optimizer_states if params.paged else 0
        frag = max(0, min(frag, fast_total - allocated - paged))
    return frag


def estimate(shape: Shape, x: MemoryInputs) -> MemoryEstimate:
    """Peak memory per GPU of the micro-step `x` describes."""
    notes: list[str] = []
    step = resolve(shape, x, notes)
    params = parameter_memory(step)
    notes += params.notes
    acts = activation_memory(step, notes)
    loss = loss_memory(step, params.param_bytes, params.grad_bytes)
    small = small_buffers(step)
    top = peak(step, params, acts, loss, notes)

    live_grads = top.gradients + params.ddp_buckets
    resident_states = 0 if params.paged else params.optimizer_states
    reference = shape.total_params * step.act_bytes if x.reference_model else 0
    if reference:
        notes.append(f"dpo: the frozen reference model holds {gib(reference)}")
    weights = params.weights + reference
    allocated = weights + live_grads + resident_states + top.activations + top.logits + small
    frag = _fragmentation(step, allocated, params)
    total = allocated + frag + (params.optimizer_states if params.paged else 0)
    cache = autocast_cache(step, params.trainable)
    parts = {
        **params.weight_parts,
        **({"reference_weights": reference} if reference else {}),
        "gradients_all": params.gradients,
        "optimizer_states": params.optimizer_states,
        "ddp_buckets": params.ddp_buckets,
        "fsdp_unit_gradient": params.fsdp_unit_gradient,
        "activations_stored": acts.stored,
        "activations_head": acts.head,
        "activations_recompute_layer": acts.recompute,
        "backward_transient": acts.transient,
        "autocast_weight_cache": cache.saved,
        "autocast_weight_cache_forward": cache.forward,
        "logits_peak": loss["peak"],
        "logits_kept": loss["kept"],
        "logits_forward": loss["forward"],
        "tied_grad_transient": shape.vocab * shape.hidden * params.grad_bytes
        if (step.head_trains and shape.tied and not x.sharded) else 0,
        "small_buffers": small,
        "fragmentation": frag,
        "layer_bytes_per_token": int(acts.layer_bytes_per_token),
    }
    if x.optimizer_in_backward:  # only then, so that the default's parts stay as they were
        parts["gradients_freed_in_backward"] = top.freed_in_backward
    layers, checkpointed = shape.layers, step.checkpointed_layers
    kept_layers = layers - checkpointed if checkpointed else acts.saving_layers
    if checkpointed < layers and acts.layer_bytes_per_token * step.tokens * kept_layers > 0.5 * total:
        notes.append("activations dominate: speed lean (gradient checkpointing) would cut them to one layer's worth")
    if loss["peak"] > 0.3 * total:
        notes.append("logits and the loss's fp32 copies dominate: a shorter max_seq_len or smaller batch helps most")
    return MemoryEstimate(
        method=x.method,
        batch_size=x.batch_size,
        seq_len=x.seq_len,
        gradient_checkpointing=step.checkpointing,
        optimizer=x.optimizer,
        gpus=x.gpus,
        strategy=x.strategy if x.gpus > 1 else "single",
        full_precision=x.full_precision if step.whole else "n/a",
        trainable_params=params.trainable,
        weights=int(weights),
        gradients=int(live_grads),
        optimizer_states=int(params.optimizer_states),
        activations=int(top.activations),
        logits=int(top.logits),
        overhead=int(small + frag),
        allocated=int(allocated),
        total=int(total),
        peak_at=top.at,
        parts={k: int(v) for k, v in parts.items()},
        notes=notes,
        speed="lean" if checkpointed == layers else "fast" if checkpointed == 0 else "balanced",
        loss="whole" if step.chunk is None else f"chunked({step.chunk})",
        checkpoint_layers=checkpointed,
    )


def estimate_memory(config: Any, **inputs: Any) -> MemoryEstimate:
    """`estimate` for a config (or Shape) and MemoryInputs' fields as keywords."""
    return estimate(shape_of(config), MemoryInputs(**inputs))

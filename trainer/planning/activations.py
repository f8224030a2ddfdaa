"""Activations: the tensors autograd saves in a micro-step, derived op by op for a Llama decoder
layer, with the per-method extras, the loss's logits and autocast's cache of bf16 weight copies.

Checkpointed layers keep only their input (the residual stream) and recompute one layer at a
time in backward; freeze's frozen lower layers see an input that needs no gradient and save
nothing (unless checkpointing makes the embedding's output require one).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.planning.inputs import LoraLayers, Step
from trainer.planning.parameters import decoder_linears_named, ia3_feedforward
from trainer.planning.shape import ATTN_IN, ATTN_OUT, MLP_IN, MLP_MID, Shape, gib, layer_suffix

# The chunked linear cross-entropy: per logit of the live chunk, its bf16 value, the fp32 upcast,
# the fp32 gradient of the softmax and its bf16 cast back for the matmul.
CHUNK_BYTES_PER_LOGIT = 2 + 4 + 4 + 2
# Checkpointed layers' inputs on the GPU with checkpoint_offload: the one whose copy to the host is
# still running or whose recompute runs, and the next one's, prefetched.
OFFLOAD_RESIDENT_LAYERS = 2


def adapted_groups(shape: Shape, lora: LoraLayers | None) -> dict[str, list[str]]:
    """Which layer-0 suffixes are adapted, by input group; every layer is assumed adapted alike."""
    if lora is None:
        return {}

    def group() -> dict[str, list[str]]:
        adapted: dict[str, list[str]] = {}
        layer0 = {layer_suffix(m.name) for m in shape.linears if m.layer == 0 and m.name in lora.modules}
        for suffix, grp in shape.groups:
            if suffix in layer0:
                adapted.setdefault(grp, []).append(suffix)
        return adapted
    # Callers read it only; a copy keeps the memo safe from one that would not.
    return {grp: list(suffixes) for grp, suffixes in shape.memo(("adapted_groups", lora.modules), group).items()}


def mlp_is_fused(shape: Shape, lora: LoraLayers | None, fused_mlp: bool) -> bool:
    """The trainer's LoRA SwiGLU MLP runs (trainer/lora_mlp.py): gate, up and down all adapted."""
    adapted = adapted_groups(shape, lora)
    return (fused_mlp and lora is not None and shape.gated_mlp and len(adapted.get(MLP_IN, [])) == 2
            and bool(adapted.get(MLP_MID)))


def layer_activation_bytes_per_token(
    shape: Shape,
    *,
    act_bytes: int = 2,
    residual_bytes: int | None = None,
    base_trainable: bool = False,
    lora: LoraLayers | None = None,
    padded: bool = False,
    seq_len: int = 0,
    autocast: bool = False,
    liger: bool = False,
    fused_mlp: bool = False,
) -> dict[str, float]:
    """Bytes autograd saves per token in one decoder layer, itemised.

    Walk of a Llama layer (h hidden, a = activation bytes, n heads of d, g kv heads, f ffn):

      x ─ RMSNorm ─ q,k,v ─ RoPE ─ sdpa ─ o ─ (+x) ─ RMSNorm ─ gate,up ─ SiLU·up ─ down ─ (+)

    * RMSNorm computes in fp32: `x.float()`, `pow(2)` saves that fp32 copy and `* rsqrt` saves it
      again (same storage): 4h. `weight * x_norm.to(bf16)` saves x_norm (a·h) only when the norm
      weight trains (full fine-tuning). With fp32 master weights the residual stream is fp32
      and the normalised output is fp32 too.
    * A linear saves its input only when its weight trains. q,k,v share one input, gate and up
      share one, so each shared input is saved once: a·h (attn_in), a·h (mlp_in), a·f (down's
      input). o_proj's input is sdpa's output, which sdpa saves anyway.
    * RoPE multiplies by cos/sin, which need no gradient, so it saves only the shared tables.
    * sdpa (flash / efficient kernels) saves q (a·n·d), k and v (a·g·d each), the output (a·n·d)
      and the fp32 logsumexp (4n). With a padding mask transformers repeats k and v to n heads
      (a·n·d each) and torch turns the bool mask into a float bias it saves: a·S per token.
    * Gated MLP: SiLU saves its input gate (a·f), the product saves both factors (a·f each).
    * peft LoRA with fp32 adapters casts each adapted module's input to fp32 separately, and
      lora_A saves that copy: 4·in per adapted module (no sharing across q,k,v), plus lora_B
      saves lora_A's output (4r). With dropout > 0 lora_A saves the dropped copy instead and
      dropout keeps a 1-byte mask: 4·in + 1·in.
      Under bf16 autocast (accelerate mixed_precision="bf16") lora_A casts that fp32 copy back to
      bf16 and saves the cast instead: 2·in per module, 2r for lora_B. peft's 4-bit layer skips
      the fp32 cast under autocast, so lora_A saves the shared bf16 input: a·in once per group.
    * Residual adds save nothing.

    * rsqrt's fp32 output: 4 bytes per token per norm.
    * With liger's kernels (the trainer's fast path on CUDA when installed): RMSNorm saves its
      input (rb·h) and the fp32 rstd (4), SwiGLU saves gate and up (2a·f) but not SiLU's output.
    * The trainer's fused LoRA layers (trainer/lora_fused.py) save the bf16 input shared with the
      base matmul and x·Aᵀ (a·r): pass a `LoraLayers` with quantized=True, which is the same pattern.
    * fused_mlp: the trainer's LoRA SwiGLU MLP as one function (trainer/lora_mlp.py), where gate,
      up and down are all adapted: it saves gate's and up's outputs (2a·f) and the x·Aᵀ, not the
      SiLU·up product that down would save as its input (backward rebuilds it).

    Llama full fine-tuning, bf16, no padding: 2·(4h + 4 + 2h) + 2h + 2h + (2h + 4g·d + 2h + 4n) + 8f
                                            = 20h + 4·g·d + 8f + 4n + 8 bytes.
    These terms match, byte for byte, the tensors autograd saves for a bf16 Llama layer on CPU
    (tests/unit/test_planner.py counts them with saved_tensors_hooks).
    """
    a = act_bytes
    rb = residual_bytes if residual_bytes is not None else a
    h, n, g, d, f = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    attn_w = n * d
    widths = {ATTN_IN: h, ATTN_OUT: attn_w, MLP_IN: h, MLP_MID: f}
    out: dict[str, float] = {}

    # + 4 bytes: rsqrt's fp32 output, one per token.
    if liger:
        out["norms"] = 2 * (rb * h + 4)
    else:
        norm_fp32 = 4 * h + 4
        norm_out = rb * h if base_trainable else 0
        out["norms"] = 2 * (norm_fp32 + norm_out)

    adapted = adapted_groups(shape, lora)

    group_members: dict[str, int] = {}
    for _, grp in shape.groups:
        group_members[grp] = group_members.get(grp, 0) + 1

    mlp_fused = mlp_is_fused(shape, lora, fused_mlp)
    linear_inputs = 0.0
    lora_saved = 0.0
    for grp, w in widths.items():
        if grp not in group_members:
            continue
        # Under autocast (fp32 master) the linear casts its fp32 input to bf16 and saves the cast.
        saved_by_base = base_trainable and grp != ATTN_OUT
        if saved_by_base:
            linear_inputs += a * w
        for _ in adapted.get(grp, []):
            if lora is None:
                break
            # dtype lora_A computes in, and whether it gets its own copy of the input.
            compute = a if autocast else lora.adapter_bytes
            own_copy = compute != a or (autocast and not lora.quantized and lora.adapter_bytes != a)
            if lora.dropout > 0:
                lora_saved += compute * w + w
            elif own_copy:
                lora_saved += compute * w
            elif mlp_fused and grp == MLP_MID:
                pass  # the fused MLP rebuilds down's input in backward
            elif not saved_by_base and grp != ATTN_OUT:
                # lora_A saves the very input tensor, shared by the group.
                lora_saved += a * w
                saved_by_base = True
            lora_saved += compute * lora.r
    out["linear_inputs"] = linear_inputs
    out["lora"] = lora_saved

    kv_saved = (2 * a * n * d) if (padded and g != n) else (2 * a * g * d)
    out["attention"] = a * attn_w + kv_saved + a * attn_w + 4 * n + (a * seq_len if padded else 0)
    if shape.gated_mlp:
        out["mlp"] = (2 if liger or mlp_fused else 3) * a * f
    else:
        out["mlp"] = a * f  # activation input; its output is down's input (counted above)
    out["total"] = sum(out.values())
    return out


def backward_transient_per_token(shape: Shape, a: int, lora: LoraLayers | None, in_place_mlp: bool = False) -> float:
    """Gradient buffers alive while one layer runs backward (MLP side, the widest), on top of that
    layer's saved activations: the incoming and outgoing hidden-state grads and up to three
    ffn-wide grads at once; LoRA's fp32 branch adds an fp32 grad of its input.

    in_place_mlp: the fused LoRA MLP (trainer/lora_mlp.py) and liger's SwiGLU both write the
    gradients of gate's and up's outputs over those saved outputs themselves, so besides them only
    the gradient reaching the SiLU-mul (one ffn-wide buffer), the incoming gradient and the input's
    gradient exist: a·(f + 2h)."""
    h, f = shape.hidden, shape.ffn
    if in_place_mlp and shape.gated_mlp:
        return a * (f + 2 * h)
    t = a * (3 * f + 3 * h)
    if lora is not None:
        t += lora.adapter_bytes * (f + h)
    return t


def method_extra_bytes_per_token(
    shape: Shape, *, method: str, act_bytes: int = 2, lora: LoraLayers | None = None, use_dora: bool = False,
    autocast: bool = False, ia3_targets: list[str] | tuple[str, ...] | None = None,
    ia3_feedforward_modules: list[str] | tuple[str, ...] | None = None,
) -> float:
    """Saved bytes per token and layer that a method adds to `layer_activation_bytes_per_token`.

    * DoRA (peft): `(m/‖W+BA‖ - 1) · base_out + m/‖W+BA‖ · lora_out · s` saves base_out (bf16)
      and lora_out (bf16 under autocast, else in the adapter's dtype) for the magnitude's
      gradient: (a + c)·out per adapted module.
    * IA3 (peft): a feed-forward target scales its input, `x · l`, which saves x (a·in); the
      others scale their output, which saves the base output (a·out).
    """
    a = act_bytes
    extra = 0.0
    if use_dora and lora is not None:
        c = a if autocast else lora.adapter_bytes
        extra += sum((a + c) * m.out_features for m in shape.linears if m.layer == 0 and m.name in lora.modules)
    if method == "ia3":
        targets, ff = ia3_feedforward(ia3_targets, ia3_feedforward_modules)
        for m in decoder_linears_named(shape, targets):
            if m.layer == 0:
                extra += a * (m.in_features if layer_suffix(m.name).rsplit(".", 1)[-1] in ff else m.out_features)
    return extra


def logits_bytes(vocab: int, tokens: int, *, out_bytes: int, chunk_tokens: int | None = None,
                 hidden: int = 0, hidden_bytes: int = 4) -> dict[str, int]:
    """The loss's memory in bytes (T = batch x seq tokens, V vocab): "model_out" what the model's
    forward returns, "forward" the loss's forward, "peak" the start of backward, "kept" what stays
    to the end of backward.

    Whole batch (chunk_tokens None: trainer.loss_heads.PlainLoss, also FSDP's loss): the
    model's logits stay referenced through backward in `out_bytes` per logit (4: accelerate's
    mixed precision returns fp32 outputs); cross-entropy's log_softmax saves its fp32 output, and
    its backward holds the incoming and the outgoing fp32 gradient at once:
        kept = o·V·T,  peak = (o + 4 + 4 + 4)·V·T
    Chunked (trainer.linear_ce, the fast path): the model answers the head's input (hidden
    states in `hidden_bytes`, fp32 after accelerate's output conversion), the loss selects the
    labelled rows (fp32), casts them to bf16 and fills a bf16 gradient for them while it runs C
    tokens at a time; one chunk holds its bf16 logits or their bf16 gradient next to the fp32
    copy: 6·C·V. Nothing of size V·T ever exists:
        forward (the loss's own peak) = 6·C·V + (hb + 4 + 2 + 2)·h·T
        peak (backward start)         = 2·h·T (the saved gradient) + 8·h·T (its fp32 cast and
                                        the scatter back into the batch's shape)
    The head weight's gradient (computed in the loss's forward when the head trains) and the
    bf16 copy of an fp32 head are added by the caller.
    """
    if chunk_tokens is None:
        # forward: the logits, the loss's reshaped copy of them and log_softmax's output.
        return {"kept": out_bytes * vocab * tokens, "peak": (out_bytes + 12) * vocab * tokens,
                "forward": (out_bytes + 8) * vocab * tokens, "model_out": 2 * vocab * tokens}
    live = 6 * min(chunk_tokens, tokens) * vocab
    return {"kept": 0, "peak": 10 * hidden * tokens, "forward": live + (hidden_bytes + 8) * hidden * tokens,
            "model_out": hidden_bytes * hidden * tokens}


@dataclass(frozen=True)
class ActivationMemory:
    layer_bytes_per_token: float  # one decoder layer's saved bytes per token, with the method's extras
    stored: int  # saved until backward: checkpointed layers' inputs, the other layers' activations
    recompute: int  # one checkpointed layer, recomputed in backward
    head: int  # the final norm and what the head keeps
    transient: int  # gradient buffers while one layer runs backward
    saving_layers: int  # layers that save activations when nothing is checkpointed


def activation_memory(step: Step, notes: list[str]) -> ActivationMemory:
    shape, x, tokens = step.shape, step.inputs, step.tokens
    hidden, layers, checkpointed, residual = shape.hidden, shape.layers, step.checkpointed_layers, step.residual_bytes
    per_layer = layer_activation_bytes_per_token(
        shape, act_bytes=step.act_bytes, residual_bytes=residual, base_trainable=step.whole, lora=step.lora,
        padded=step.padded, seq_len=x.seq_len + step.prefix_tokens, autocast=step.lora_autocast,
        liger=x.liger, fused_mlp=step.fused_lora,
    )
    layer_tok = per_layer["total"] + method_extra_bytes_per_token(
        shape, method=x.method, act_bytes=step.act_bytes, lora=step.lora,
        use_dora=step.lora is not None and step.lora.use_dora, autocast=step.lora_autocast,
        ia3_targets=x.ia3.target_modules, ia3_feedforward_modules=x.ia3.feedforward_modules,
    )
    saving_layers = x.freeze_layers if x.method == "freeze" else layers
    if step.checkpointing:
        # Non-reentrant checkpointing keeps each checkpointed layer's input (the residual stream);
        # with a frozen embedding the trainer makes its output require a gradient, so every layer
        # above saves its activations.
        resident = min(checkpointed, OFFLOAD_RESIDENT_LAYERS) if x.checkpoint_offload else checkpointed
        layer_input = residual * hidden * tokens
        stored = resident * layer_input + (layers - checkpointed) * layer_tok * tokens
        recompute = layer_tok * tokens
        if checkpointed > resident:
            offloaded, host = gib((checkpointed - resident) * layer_input), gib(checkpointed * layer_input)
            notes.append(f"checkpoint_offload: {offloaded} of checkpointed layers' inputs wait in pinned host "
                         f"memory ({host} of host memory)")
    else:
        stored = saving_layers * layer_tok * tokens
        recompute = 0
    if x.method == "prefix":
        # The virtual tokens' keys and values, saved by attention per layer and row.
        stored += layers * x.batch_size * step.prefix_tokens * 2 * step.act_bytes * shape.heads * shape.head_dim
    # Final norm: its fp32 copy, its output when its weight trains, and what the head keeps.
    if x.liger:
        head_tok = residual * hidden + 4
    else:
        head_tok = 4 * hidden + 4 + (residual * hidden if step.norm_trains else 0)
    if step.chunk is None and step.head_trains:
        # The head's saved input (the chunked loss computes its gradients in its forward and keeps none).
        head_tok += (2 if step.autocast else residual) * hidden
    return ActivationMemory(
        layer_bytes_per_token=layer_tok, stored=stored, recompute=recompute, head=head_tok * tokens,
        transient=backward_transient_per_token(
            shape, step.act_bytes, step.lora, x.liger or mlp_is_fused(shape, step.lora, step.fused_lora)) * tokens,
        saving_layers=saving_layers,
    )


@dataclass(frozen=True)
class AutocastCache:
    forward: int  # bf16 copies alive when the forward ends
    saved: int  # of them, those the matmuls save for backward
    recompute: int  # the copies a recomputed layer makes again


def autocast_cache(step: Step, trainable: int) -> AutocastCache:
    """Autocast caches a bf16 copy of every fp32 weight that trains (a leaf that requires grad)
    until the forward ends; the matmul saves it for backward unless the layer is checkpointed.
    Frozen fp32 weights (freeze's lower layers) are cast anew and saved only where their input
    needs a gradient: the head's."""
    shape, x = step.shape, step.inputs
    layers, checkpointed = shape.layers, step.checkpointed_layers
    if step.casts:
        layer_matmul = shape.layer_matmul_params
        trained_layers = layers if x.method == "full" else x.freeze_layers
        head_cast = 0 if step.chunk is not None else 2 * shape.vocab * shape.hidden
        # The layers that are not checkpointed save their casts (the top ones, which train in freeze too).
        return AutocastCache(
            forward=2 * trained_layers * layer_matmul + head_cast,
            saved=head_cast + 2 * min(trained_layers, layers - checkpointed) * layer_matmul,
            recompute=2 * layer_matmul if step.checkpointing else 0,
        )
    if step.lora is not None and step.lora_autocast and step.fused_lora:
        # The fused layers' own cache: a bf16 copy of each fp32 adapter weight, kept from the
        # first product after an optimizer step through the next (trainer.lora_fused.adapter_weight).
        return AutocastCache(forward=2 * trainable, saved=2 * trainable, recompute=2 * trainable)
    if step.lora is not None and step.lora_autocast and not step.fused_lora:
        return AutocastCache(
            forward=2 * trainable,
            saved=2 * trainable * (layers - checkpointed) // layers,
            recompute=2 * trainable // layers if step.checkpointing else 0,
        )
    return AutocastCache(0, 0, 0)


def loss_memory(step: Step, param_bytes: int, grad_bytes: int) -> dict[str, int]:
    """logits_bytes for the step, with the head's gradient where the chunked loss makes it."""
    shape, x = step.shape, step.inputs
    logits = logits_bytes(shape.vocab, step.tokens, out_bytes=4 if step.autocast else step.act_bytes,
                          chunk_tokens=step.chunk, hidden=shape.hidden,
                          hidden_bytes=4 if step.autocast else step.residual_bytes)
    if step.chunk is None or not step.head_trains:
        return logits
    # The head's gradient exists from the loss's forward on (at the end of backward it is one of
    # the gradients); an fp32 head is cast to bf16 for the loop.
    head_matmul = shape.vocab * shape.hidden
    head_grad = head_matmul * grad_bytes if x.gradient_accumulation_steps == 1 else 0
    head_cast = 2 * head_matmul if param_bytes == 4 and step.act_bytes == 2 else 0
    return {**logits, "peak": logits["peak"] + head_grad, "forward": logits["forward"] + head_grad + head_cast}


"""LoRA linear layers as one autograd function: y = x W^T + b + s (x A^T) B^T.

peft computes the adapter as separate modules: with fp32 adapter weights it copies x to fp32 for
every adapted layer (under autocast a bf16 copy of that again is what lora_A saves), builds
lora_B's output, scales it into another tensor and adds that to the base output: several
tensors of the layer's input or output size per layer, each written and read again, in forward
and in backward. Here the adapter's product is added into the base output in place (addmm), the
only tensors saved are the input (shared with the base matmul, and between q/k/v, which read the
same one) and x A^T (rank-sized), and backward computes the same four products peft's graph does.

Only the plain case is fused: one active adapter, no dropout, no DoRA, a frozen nn.Linear or
bitsandbytes 4-bit base. Anything else keeps peft's forward, which stays the reference: the unit
tests compare the two.

A 4-bit base's product is its own forward (bitsandbytes' Linear4bit), called on the caller's input
under the caller's autocast, as peft calls it: bitsandbytes picks its kernel by device, CPU
features, mode and input (its CUDA gemm_4bit kernels; on a CPU with AVX512-BF16, for an eval-mode
layer whose input needs no gradient, a bf16 kernel on a repacked weight), and a dequantize +
matmul of our own matched only some of those choices. Its backward is bitsandbytes' own formula
(input gradient = grad @ dequantized weight), fused here with the adapter's.

Except on a GPU, for a training batch: there bitsandbytes always dequantizes the weight and calls
F.linear (its own kernel serves only inputs of at most BNB_KERNEL_ROWS rows), so the layer does
the same two steps itself, through bitsandbytes' dequantize ops. The kernels are the same; what is
skipped is several Python calls deep of checks and dispatch per product, three products per layer
per step under gradient checkpointing: host time that the host's lead on the GPU (the launch
queue's worth of work) need not cover.
"""

from __future__ import annotations

import copy
from types import MethodType
from typing import Any

import torch


def _is_4bit(weight: Any) -> bool:
    return weight.__class__.__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


# bitsandbytes (0.50) multiplies by a 4-bit weight on CUDA with its own kernel for inputs of up to
# this many rows, and by dequantizing it and calling F.linear above (its gemm_4bit op).
BNB_KERNEL_ROWS = 1536
OWN_PRODUCT_DEVICES = ("cuda",)  # where that is so (a test adds the CPU to compare the two)


def _dequantize_4bit(weight: Any) -> torch.Tensor:
    """A 4-bit weight in its quant state's dtype, what bitsandbytes.functional.dequantize_4bit
    computes (double-quantized block scales first dequantized to fp32), through its ops."""
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, s2.absmax, s2.code, s2.blocksize, s2.dtype)
        absmax += state.offset
        absmax = absmax.float()
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax, state.blocksize, state.quant_type,
                                                           state.shape, state.dtype)


def _dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _is_4bit(weight):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            import bitsandbytes.functional as bnbf

            # Linear4bit.forward repacked it for its CPU bf16 kernel (eval mode, an input without
            # gradient: a validation pass), which has no backward; dequantize bitsandbytes' own
            # inverse of that packing, on a copy of the state (the inverse rewrites the state it
            # gets, and the layer keeps the packed one).
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
            return bnbf.dequantize_4bit(data, state).to(dtype)
        return _dequantize_4bit(weight).to(dtype)
    return weight.to(dtype)


def own_4bit_product(base: Any, x: torch.Tensor, cd: torch.dtype) -> bool:
    """Whether the 4-bit `base` layer's product on x (rows x features, any leading shape) is the
    dequantize + F.linear that bitsandbytes would run, here in compute dtype cd: on CUDA, above
    its kernel's rows, when the layer computes in cd and was quantized from cd (so that neither
    side casts the weight)."""
    state = base.weight.quant_state
    rows = x.numel() // x.shape[-1]
    return (x.device.type in OWN_PRODUCT_DEVICES and rows > BNB_KERNEL_ROWS and base.compute_dtype == cd
            and state.dtype == cd and not getattr(state, "packing_format_for_cpu", False))


_weights_generation = 0


def weights_stepped() -> None:
    """The optimizer has changed the trained weights. Its fused step does so without bumping their
    version counters, so adapter_weight's copies are keyed on this count too."""
    global _weights_generation
    _weights_generation += 1


def adapter_weight(weight: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """An adapter weight in compute dtype. An fp32 master's bf16 copy is made once per optimizer
    step, by the first product that needs it, and read by the rest: the forward, the recomputed
    forward and the backward of every micro-batch each made their own before, two small kernels
    per adapted layer and pass. It lives with the weight (the planner counts it), and is made again
    after an optimizer step (weights_stepped), an in-place change (the version counter) or a new
    storage."""
    if weight.dtype == cd:
        return weight
    key = (_weights_generation, weight._version, weight.data_ptr(), cd)
    cached = getattr(weight, "_tuneq_cast", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    copy_ = weight.detach().to(cd)
    weight._tuneq_cast = (key, copy_)
    return copy_


def adapted_product(x2: torch.Tensor, base_out: torch.Tensor | None, weight: Any, bias: torch.Tensor | None,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + b + s (x A^T) B^T, x A^T) for 2-D x2 in compute dtype cd, autocast off. base_out: a
    4-bit layer's own forward, already run under the caller's autocast (bias included); None: the
    dense product here. The adapter's product is added in place."""
    if base_out is not None:
        y = base_out.reshape(-1, base_out.shape[-1]).to(cd)
    else:
        w = _dense_weight(weight, cd)
        y = torch.addmm(bias.to(cd), x2, w.t()) if bias is not None else x2 @ w.t()
    xa = x2 @ adapter_weight(lora_a, cd).t()
    y.addmm_(xa, adapter_weight(lora_b, cd).t(), alpha=scaling)
    return y, xa


def adapter_grads(g: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scaling: float, cd: torch.dtype, need_a: bool = True,
                  need_b: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Given g = d loss / d y of adapted_product: (d loss / d (x A^T), A's gradient, B's gradient)."""
    gxa = (g @ adapter_weight(lora_b, cd)).mul_(scaling)
    grad_b = (g.t() @ xa).mul_(scaling).to(lora_b.dtype) if need_b else None
    grad_a = (gxa.t() @ x2).to(lora_a.dtype) if need_a else None
    return gxa, grad_a, grad_b


def compute_dtypes(x: torch.Tensor, base: Any) -> tuple[torch.dtype, torch.dtype]:
    """(compute, output) dtype of an adapted layer on x: autocast's; else a 4-bit base computes
    in its compute dtype and answers in the input's, as bitsandbytes does."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind), torch.get_autocast_dtype(kind)
    compute = (getattr(base, "compute_dtype", None) or x.dtype) if _is_4bit(base.weight) else x.dtype
    return compute, x.dtype


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight, bias, lora_a, lora_b, scaling, compute_dtype, out_dtype, base4bit=None
    ):
        shape = x.shape
        if base4bit is not None and own_4bit_product(base4bit, x, compute_dtype):
            base4bit = None  # adapted_product dequantizes and multiplies, as bitsandbytes would
        if base4bit is not None:
            # The 4-bit layer's own forward, on the caller's x (its requires_grad intact) under the
            # caller's autocast: what peft's base_layer(x) computes. Grad mode is off in here, so
            # bitsandbytes runs its gemm_4bit op directly instead of through MatMul4Bit, whose
            # forward is that same op. It adds the bias and answers in x's dtype.
            y = base4bit(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(compute_dtype)
            y, xa = adapted_product(x2, y if base4bit is not None else None, weight, bias, lora_a, lora_b, scaling,
                                    compute_dtype)
        ctx.save_for_backward(x2, xa, lora_a, lora_b)
        # The frozen weight is a parameter that lives anyway; keeping a reference costs nothing,
        # and a 4-bit one is dequantised again in backward (as bitsandbytes' MatMul4Bit does)
        # rather than kept in bf16.
        ctx.weight, ctx.scaling, ctx.compute_dtype = weight, scaling, compute_dtype
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.reshape(*shape[:-1], y.shape[-1]).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, xa, lora_a, lora_b = ctx.saved_tensors
        cd, s = ctx.compute_dtype, ctx.scaling
        with torch.autocast(x2.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
            gxa, grad_a, grad_b = adapter_grads(g, x2, xa, lora_a, lora_b, s, cd, *ctx.needs_input_grad[3:5])
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ _dense_weight(ctx.weight, cd)).addmm_(gxa, adapter_weight(lora_a, cd))
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def _fusable(module: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    active = list(module.active_adapters)
    if len(active) != 1 or active[0] not in module.lora_A or active[0] in getattr(module, "lora_variant", {}):
        return False
    name = active[0]
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return False
    base = module.get_base_layer()
    if not isinstance(base, torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
        return False
    weight = base.weight
    if weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    return weight.is_floating_point() and weight.ndim == 2 or _is_4bit(weight)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or self.disable_adapters or self.merged or not x.is_floating_point():
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.get_base_layer()
    compute, out = compute_dtypes(x, base)
    return _LoraLinear.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]),
        compute, out, base if _is_4bit(base.weight) else None,
    )


def fuse_lora(model: Any) -> int:
    """Give every plain LoRA linear of `model` the fused forward; returns how many were fused."""
    try:
        from peft.tuners.lora import LoraLayer  # noqa: F401
    except ImportError:
        return 0
    fused = 0
    for module in model.modules():
        if _fusable(module):
            module.forward = MethodType(_fused_forward, module)
            fused += 1
    return fused

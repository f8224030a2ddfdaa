"""A LoRA SwiGLU MLP as one autograd function: down(silu(gate(x)) * up(x)), all three adapted.

With each projection fused on its own (trainer.lora_fused) and Liger's SiLU-mul between them, a
decoder layer's backward holds four tensors of the MLP's width at once (16 k tokens x 8192 on
the 1B shape: 256 MiB each): gate's and up's outputs (saved by the SiLU-mul), the SiLU-mul's
output (saved by the down projection as its input) and the gradient arriving at it. A memory
trace of the peak (bench/memory_peak.py, 2026-11-30) showed exactly those, 0.22 GiB above
Unsloth's peak, whose MLP keeps three.

Here the forward saves only x, gate's and up's outputs and the rank-sized products x A^T; the
SiLU-mul output is dropped after the down projection. In backward, once the gradient reaching
it (dc) exists, one elementwise pass over (dc, a, b) writes the SiLU-mul output back into dc's
buffer and the gradients of a and b over a and b themselves, so three buffers serve where four
were. The down adapter's A-gradient reads the restored output; the rest is what _LoraLinear
computes for each projection.

The pass is a Triton kernel on CUDA (fp32 arithmetic on bf16/fp16/fp32 storage); elsewhere the
same arithmetic in torch, which allocates temporaries (a CPU has memory to spare).
"""

from __future__ import annotations

import os
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from trainer.lora_fused import (
    _dense_weight,
    _fusable,
    _is_4bit,
    adapted_product,
    adapter_grads,
    adapter_weight,
    compute_dtypes,
    own_4bit_product,
)

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _swiglu_back_kernel(dc_ptr, a_ptr, b_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        tl.store(dc_ptr + offs, (silu * b).to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(a_ptr + offs, (dc * b * sig * (1.0 + a * (1.0 - sig))).to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(b_ptr + offs, (dc * silu).to(b_ptr.dtype.element_ty), mask=mask)


def _kernel_available(t: torch.Tensor) -> bool:
    if triton is None or os.environ.get("TUNEQ_MLP_KERNEL", "1") == "0":
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def swiglu_back_in_place(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dc <- silu(a) * b, a <- d/da, b <- d/db (of silu(a) * b, given its gradient dc)."""
    if _kernel_available(dc) and dc.is_contiguous() and a.is_contiguous() and b.is_contiguous():
        n = dc.numel()
        _swiglu_back_kernel[(triton.cdiv(n, BLOCK),)](dc, a, b, n, BLOCK=BLOCK)
        return
    # Copies even of fp32 inputs: dc, a and b are overwritten while the others are still read.
    a32, b32, dc32 = (t.to(torch.float32, copy=True) for t in (a, b, dc))
    sig = torch.sigmoid(a32)
    silu = a32 * sig
    dc.copy_(silu * b32)
    a.copy_(dc32 * b32 * sig * (1.0 + a32 * (1.0 - sig)))
    b.copy_(dc32 * silu)


def _base_out(base4bit: Any, x: torch.Tensor, cd: torch.dtype) -> torch.Tensor | None:
    """A 4-bit projection's own forward on x, or None where adapted_product computes it (a dense
    base, or the dequantize + matmul bitsandbytes would run: trainer.lora_fused.own_4bit_product)."""
    if base4bit is None or own_4bit_product(base4bit, x, cd):
        return None
    return base4bit(x)


class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ga, gb, ua, ub, da, db, bases, compute_dtype, out_dtype):  # type: ignore[override]
        # bases: (weight, 4-bit module or None, scaling) of gate, up and down
        (gw, g4, gs), (uw, u4, us), (dw, d4, ds) = bases
        cd, shape, kind = compute_dtype, x.shape, x.device.type
        g_base, u_base = _base_out(g4, x, cd), _base_out(u4, x, cd)
        with torch.autocast(kind, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(cd)
            a, xa_g = adapted_product(x2, g_base, gw, None, ga, gb, gs, cd)
            b, xa_u = adapted_product(x2, u_base, uw, None, ua, ub, us, cd)
            del g_base, u_base
            c = F.silu(a).mul_(b)
        d_base = _base_out(d4, c, cd)
        with torch.autocast(kind, enabled=False):
            y, xa_d = adapted_product(c, d_base, dw, None, da, db, ds, cd)
        del c, d_base  # the point: backward rebuilds c in the buffer of its gradient
        ctx.save_for_backward(x2, a, b, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db)
        ctx.weights, ctx.scalings, ctx.cd = (gw, uw, dw), (gs, us, ds), cd
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.reshape(*shape[:-1], y.shape[-1]).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, a, b, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db = ctx.saved_tensors
        (gw, uw, dw), (gs, us, ds), cd = ctx.weights, ctx.scalings, ctx.cd
        need = ctx.needs_input_grad  # x, ga, gb, ua, ub, da, db, ...
        with torch.autocast(x2.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
            gxa_d = (g @ adapter_weight(db, cd)).mul_(ds)  # d loss / d (c A_down^T)
            grad_db = (g.t() @ xa_d).mul_(ds).to(db.dtype) if need[6] else None
            dc = (g @ _dense_weight(dw, cd)).addmm_(gxa_d, adapter_weight(da, cd))
            del g
            swiglu_back_in_place(dc, a, b)  # now dc holds c, a and b their gradients
            grad_da = (gxa_d.t() @ dc).to(da.dtype) if need[5] else None
            del dc
            gxa_g, grad_ga, grad_gb = adapter_grads(a, x2, xa_g, ga, gb, gs, cd, need[1], need[2])
            gxa_u, grad_ua, grad_ub = adapter_grads(b, x2, xa_u, ua, ub, us, cd, need[3], need[4])
            grad_x = None
            if need[0]:
                grad_x = a @ _dense_weight(gw, cd)
                grad_x.addmm_(gxa_g, adapter_weight(ga, cd)).addmm_(b, _dense_weight(uw, cd))
                grad_x.addmm_(gxa_u, adapter_weight(ua, cd))
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_ga, grad_gb, grad_ua, grad_ub, grad_da, grad_db, None, None, None


def _adapter(proj: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor, float]:
    name = proj.active_adapters[0]
    base = proj.get_base_layer()
    return (base.weight, base if _is_4bit(base.weight) else None, proj.lora_A[name].weight, proj.lora_B[name].weight,
            float(proj.scaling[name]))


def _fusable_mlp(module: Any) -> bool:
    projs = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None or not _fusable(p) for p in projs):
        return False
    if any(p.get_base_layer().bias is not None for p in projs):
        return False
    act = getattr(getattr(module, "config", None), "hidden_act", None) or getattr(module, "hidden_act", None)
    return act in ("silu", "swish")


def _mlp_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    projs = (self.gate_proj, self.up_proj, self.down_proj)
    if args or kwargs or not x.is_floating_point() or any(p.disable_adapters or p.merged for p in projs):
        return self._tuneq_unfused_forward(x, *args, **kwargs)
    gw, g4, ga, gb, gs = _adapter(self.gate_proj)
    uw, u4, ua, ub, us = _adapter(self.up_proj)
    dw, d4, da, db, ds = _adapter(self.down_proj)
    compute, out = compute_dtypes(x, self.gate_proj.get_base_layer())
    return _LoraMLP.apply(x, ga, gb, ua, ub, da, db, ((gw, g4, gs), (uw, u4, us), (dw, d4, ds)), compute, out)


def fuse_lora_mlps(model: Any) -> int:
    """Give every SwiGLU MLP whose three projections are plain LoRA linears the fused forward;
    returns how many."""
    fused = 0
    for module in model.modules():
        if _fusable_mlp(module) and not hasattr(module, "_tuneq_unfused_forward"):
            module._tuneq_unfused_forward = module.forward
            module.forward = MethodType(_mlp_forward, module)
            fused += 1
    return fused

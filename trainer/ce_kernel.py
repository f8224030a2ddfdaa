"""Cross-entropy rows of one logits chunk in a single Triton kernel (CUDA only).

The chunked loss (trainer.linear_ce) spent about 30 % of a full fine-tuning step on the 1B shape
outside its matmuls, in torch's separate passes over each chunk: argmax, the fp32 copy,
log-sum-exp (several passes), exp, the one-hot subtraction and the cast back (profile in
bench/results/train_throughput_full_h200_profile_tuneq-full-bf16-lean.md). Here one program per
row reads the bf16 logits once for max, argmax and the sum of exponentials (online softmax), and
once more to write the gradient softmax - onehot over the logits in place, in their own dtype.
No fp32 copy of the chunk exists, so the same memory holds three times the tokens per chunk.

`available()` says whether the kernel can run; the torch path stays for CPUs and for hosts
without Triton, and TUNEQ_CE_KERNEL=0 forces it (for measuring).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(logits_dtype: torch.dtype, device: torch.device) -> bool:
    if triton is None or os.environ.get("TUNEQ_CE_KERNEL", "1") == "0":
        return False
    # TRITON_INTERPRET runs the kernel on the CPU (numpy), which is how it is tested without a GPU.
    on_device = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and logits_dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, argmax_ptr, vocab,
                        BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        running_max = tl.full([], float("-inf"), tl.float32)
        running_sum = tl.zeros([], tl.float32)
        best = tl.zeros([], tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            block_max = tl.max(x, 0)
            # Strictly greater: the first of equal maxima wins, as torch.argmax's does.
            best = tl.where(block_max > running_max, start + tl.argmax(x, 0).to(tl.int32), best)
            new_max = tl.maximum(running_max, block_max)
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target_logit = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - target_logit)
        tl.store(argmax_ptr + row, best)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < vocab
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
                tl.store(base + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32) and argmax (int32) of `logits` [n, V]; with write_grad, `logits` is
    overwritten by d(loss)/d(logits) = softmax - onehot(target), in its own dtype."""
    if logits.stride(-1) != 1:
        raise ValueError("logits: the vocabulary dimension must be contiguous")
    n, vocab = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    argmax = torch.empty(n, device=logits.device, dtype=torch.int32)
    if n:
        _ce_rows_kernel[(n,)](logits, logits.stride(0), targets, loss, argmax, vocab,
                              BLOCK=4096, WRITE_GRAD=write_grad, num_warps=8)
    return loss, argmax

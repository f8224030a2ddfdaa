"""Cross-entropy through the LM head a chunk of tokens at a time: full-vocabulary logits never exist.

At Llama-3 shape (vocabulary 128,256) one micro-batch of 8 x 2048 tokens has 2.1 billion logits:
4 GiB in bf16 and 8 GiB more for the fp32 copy the loss takes, plus softmax and gradient of the
same size. Here the head's matmul, the log-sum-exp and the logits' gradient run on `chunk` tokens
at a time. The gradients of the hidden states and of the head's weight are computed in the
forward pass, while the chunk's logits exist anyway, so backward only scales them by the incoming
gradient: three matmuls per chunk instead of the four that recomputing in backward would take.

Live memory beyond the inputs (`live_bytes`): one chunk's logits and their fp32 copy, which
becomes the softmax and then the gradient in place, then a compute-dtype copy of that gradient:
at most chunk x vocab x 8 bytes at any moment; plus the gradient of the selected hidden states
(tokens x hidden, compute dtype), a compute-dtype copy of the head weight if it is stored wider,
and, when the head trains, its weight gradient (the size of the weight, which backward would
allocate anyway).

Numerics match `F.cross_entropy` on `logits.float()`: the matmul runs in the compute dtype (bf16
under autocast, as the model's own head would), everything after it in fp32.
"""

from __future__ import annotations

import os

import torch

from trainer import ce_kernel

# fp32 bytes of one chunk's logits; 128 MiB gives 256 tokens at a 128k vocabulary: the head's
# matmuls still have 256 rows (efficient on tensor cores), and the loss's ~0.25 GiB stays small
# next to a checkpointed 1B model's activations.
CHUNK_BYTES = 128 * 1024**2
MIN_CHUNK, MAX_CHUNK = 16, 8192


def chunk_tokens(vocab: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit the budget.

    TUNEQ_CE_CHUNK_TOKENS overrides it (for measuring; not a job setting).
    """
    forced = os.environ.get("TUNEQ_CE_CHUNK_TOKENS", "").strip()
    if forced:
        return max(1, int(forced))
    budget = budget_bytes if budget_bytes is not None else CHUNK_BYTES
    n = max(1, budget // (4 * max(vocab, 1)))
    n = 1 << (n.bit_length() - 1)
    return max(MIN_CHUNK, min(MAX_CHUNK, n))


def live_bytes(vocab: int, chunk: int, compute_bytes: int = 2) -> int:
    """Bytes of vocabulary-wide tensors the chunk loop holds at its peak (for the planner).

    In turn: the logits (compute dtype) and their fp32 copy; the fp32 copy and log-sum-exp's
    fp32 temporary; the fp32 gradient and its compute-dtype copy. The middle one is the largest,
    8 bytes per logit, unless the compute dtype is wider than 4 bytes.
    """
    return chunk * vocab * max(8, compute_bytes + 4)


_ADDMM_FP32_OUT: dict[tuple[str, torch.dtype], bool] = {}


def _fp32_out_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm can add a low-precision product straight into a fp32 tensor here (CUDA's
    out_dtype variant), checked once on small tensors against the plain computation."""
    key = (device.type, dtype)
    if key not in _ADDMM_FP32_OUT:
        try:
            a = torch.randn(8, 16, device=device).to(dtype)
            b = torch.randn(16, 8, device=device).to(dtype)
            acc = torch.ones(8, 8, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            want = 1.0 + a.float() @ b.float()
            _ADDMM_FP32_OUT[key] = bool(torch.allclose(acc, want, rtol=1e-2, atol=1e-2))
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_FP32_OUT[key] = False
    return _ADDMM_FP32_OUT[key]


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b where acc is fp32 and a, b are bf16/fp16: without a weight-sized temporary
    where the device can write the fp32 result directly."""
    if _fp32_out_addmm_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def _chunk_loop(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int,
    grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
    row_losses: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sum and correct count; fills grad_h / grad_w (d loss_sum / d input) when given.

    row_losses: filled with each row's loss when given. row_scale: each row's loss weighs this
    much in the gradients (d sum(row_scale * row_loss) / d input)."""
    # fp32 at least: the loss and softmax of bf16 logits are taken in fp32, as F.cross_entropy on
    # logits.float() would; fp64 inputs stay fp64.
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    loss = torch.zeros((), device=h.device, dtype=acc_dtype)
    correct = torch.zeros((), device=h.device, dtype=torch.long)
    want_grad = grad_h is not None or grad_w is not None
    # The kernel keeps no fp32 copy: 2 bytes a logit instead of 8 (the planner's 6·C·V with the
    # bf16 gradient copy), so three times the tokens fit the same chunk memory.
    fused = acc_dtype == torch.float32 and ce_kernel.available(h.dtype, h.device)
    step = chunk * 3 if fused else chunk
    for start in range(0, h.shape[0], step):
        hc, tc = h[start : start + step], targets[start : start + step]
        logits = hc @ w.t()
        if fused:
            row_loss, argmax = ce_kernel.cross_entropy_rows(logits, tc, write_grad=want_grad)
            loss += row_loss.sum()
            correct += (argmax == tc).sum()
            if row_losses is not None:
                row_losses[start : start + hc.shape[0]] = row_loss
            if want_grad:
                if row_scale is not None:
                    logits.mul_(row_scale[start : start + hc.shape[0], None].to(logits.dtype))
                _head_gradients(logits, hc, w, start, grad_h, grad_w)
            continue
        correct += (logits.argmax(-1) == tc).sum()
        z = logits.to(acc_dtype)
        if z is not logits:
            del logits  # the fp32 copy is all that is needed from here on
        lse = torch.logsumexp(z, dim=-1)
        row_loss = lse - z.gather(1, tc[:, None]).squeeze(1)
        loss += row_loss.sum()
        if row_losses is not None:
            row_losses[start : start + hc.shape[0]] = row_loss
        if grad_h is None and grad_w is None:
            continue
        # d(lse - z_t)/dz = softmax(z) - onehot(t), built in place in the fp32 copy.
        z.sub_(lse[:, None]).exp_()
        z[torch.arange(z.shape[0], device=z.device), tc] -= 1.0
        if row_scale is not None:
            z.mul_(row_scale[start : start + hc.shape[0], None])
        g = z.to(h.dtype)
        del z
        _head_gradients(g, hc, w, start, grad_h, grad_w)
    return loss, correct


def _head_gradients(g: torch.Tensor, hc: torch.Tensor, w: torch.Tensor, start: int,
                    grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> None:
    """From a chunk's logits gradient g: its rows of grad_h, and its share of grad_w."""
    if grad_h is not None:
        torch.mm(g, w, out=grad_h[start : start + g.shape[0]])
    if grad_w is not None:
        if grad_w.dtype == g.dtype:
            grad_w.addmm_(g.t(), hc)
        else:
            _accumulate_fp32(grad_w, g.t(), hc)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype, need_h, need_w):  # type: ignore[override]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=weight.dtype if weight.is_floating_point() else compute_dtype) \
                if need_w else None
            loss, correct = _chunk_loop(h, w, targets, chunk, grad_h, grad_w)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) if ctx.has[0] else None
        grad_w = saved.pop(0) if ctx.has[1] else None
        # The saved gradients are used once; scaling them in place avoids a second copy.
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype)).to(ctx.hidden_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    chunk: int | None = None, compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of -log softmax(hidden @ weight.T)[target], rows whose argmax is the target).

    hidden [N, d] and targets [N] hold only the rows that count (no ignore index); weight [V, d]
    is the LM head's. compute_dtype: the head matmul's dtype (default: the autocast dtype when
    autocast is on, else the hidden states' dtype).
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, *_call_arguments(hidden, weight, chunk, compute_dtype))


def _call_arguments(hidden: torch.Tensor, weight: torch.Tensor, chunk: int | None,
                    compute_dtype: torch.dtype | None) -> tuple[int, torch.dtype, bool, bool]:
    """(chunk, compute dtype, hidden needs a gradient, weight needs one), defaults resolved."""
    if compute_dtype is None:
        kind = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    grad_on = torch.is_grad_enabled()
    return (chunk or chunk_tokens(weight.shape[0]), compute_dtype, grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad)


class _LinearTokenLogprobs(torch.autograd.Function):
    """Per-row log-probabilities of the targets; the preference objectives weigh each sequence's
    tokens differently, so the gradients depend on the rows' incoming gradients. The hidden
    states' are computed in forward (as for the loss) and scaled per row in backward; the head's,
    when it trains, are computed in backward, a chunk at a time again."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype, need_h, need_w):  # type: ignore[override]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            rows = torch.empty(h.shape[0], device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
            grad_h = torch.empty_like(h) if need_h else None
            _chunk_loop(h, w, targets, chunk, grad_h, None, row_losses=rows)
        ctx.save_for_backward(*(t for t in (grad_h,) if t is not None), *((h, targets) if need_w else ()))
        ctx.has = (need_h, need_w)
        ctx.chunk, ctx.hidden_dtype, ctx.weight = chunk, hidden.dtype, weight
        ctx.compute_dtype = compute_dtype
        return rows.neg_()

    @staticmethod
    def backward(ctx, grad_logp):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) if ctx.has[0] else None
        # log p = -row loss: each row's loss gradient scaled by minus the row's incoming gradient.
        scale = -grad_logp.to(torch.promote_types(grad_logp.dtype, torch.float32))
        if grad_h is not None:
            grad_h = grad_h.mul_(scale[:, None].to(grad_h.dtype)).to(ctx.hidden_dtype)
        grad_w = None
        if ctx.has[1]:
            h, targets = saved
            weight = ctx.weight
            with torch.autocast(h.device.type, enabled=False):
                grad_w = torch.zeros_like(weight, dtype=weight.dtype if weight.is_floating_point() else ctx.compute_dtype)
                _chunk_loop(h, weight.to(ctx.compute_dtype), targets, ctx.chunk, None, grad_w, row_scale=scale)
        return grad_h, grad_w, None, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    chunk: int | None = None, compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] of each row, [N] in fp32, without full-vocabulary
    logits beyond one chunk (as linear_cross_entropy; the same arguments)."""
    return _LinearTokenLogprobs.apply(hidden, weight, targets, *_call_arguments(hidden, weight, chunk, compute_dtype))

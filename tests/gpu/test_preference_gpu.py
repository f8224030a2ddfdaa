"""The preference path on a GPU: the chunked per-row log-probabilities through the Triton
cross-entropy kernel (bf16) equal log_softmax of the whole logits, gradients included."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_kernel_token_logprobs_match_the_whole_logits_in_bf16():
    from trainer.linear_ce import linear_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 256, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 32000, (1000,), device="cuda")
    weights = torch.randn(1000, device="cuda")
    got = linear_token_logprobs(h, w, t, chunk=128)
    (got * weights).sum().backward()
    grads = h.grad.float(), w.grad.float()
    h.grad = w.grad = None
    want = torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(grads[0], h.grad.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(grads[1], w.grad.float(), rtol=5e-2, atol=5e-2)

"""The fast path on a CUDA GPU, in bf16: it trains like the plain loop over 50 steps (within bf16
noise) and its loss holds far less memory.

Marked `gpu`: run on the lent H200 with `python3 -m pytest -m gpu tests/gpu/test_fastpath_gpu.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(tiny_model_dir: Path, data: Path, out: Path, method: str, speed: str) -> list[dict]:
    from trainer.job import run_job
    from trainer.spec import JobSpec

    body = {"model": str(tiny_model_dir), "method": method, "training_file": str(data), "speed": speed,
            "hyperparameters": {"max_steps": 50, "batch_size": 8, "learning_rate": 1e-3 if method == "full" else 3e-3,
                                "seed": 3}}
    if method == "full":
        body["full_precision"] = "bf16"
    else:
        body["lora"] = {"r": 16, "alpha": 32}
    assert run_job(JobSpec.model_validate(body), out) == 0
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "speed"), [("lora", "lean"), ("lora", "fast"), ("qlora", "lean"), ("full", "fast")])
def test_fast_path_trains_like_the_plain_loop_in_bf16(tiny_model_dir: Path, tmp_path: Path, monkeypatch, method, speed):
    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    runs = {}
    for name, env in (("plain", "0"), ("fast", "1")):
        monkeypatch.setenv("TUNEQ_FASTPATH", env)
        monkeypatch.setenv("TUNEQ_CE_CHUNK_TOKENS", "64")  # several chunks per micro-batch
        runs[name] = _train(tiny_model_dir, data, tmp_path / name, method, speed)
    start = next(e["data"] for e in runs["fast"] if e["type"] == "start")
    assert start["fast_path"]["loss"] == "chunked"
    assert start["fast_path"]["gradient_checkpointing"] is (speed == "lean")
    if method != "full":
        assert start["fast_path"]["fused_lora_layers"] == 14
        assert start["fast_path"]["fused_lora_mlps"] == 2
    if importlib.util.find_spec("liger_kernel") is not None:
        assert start["fast_path"]["liger_kernels"], "liger-kernel is installed but was not applied"

    losses = {k: torch.tensor([e["data"]["train_loss"] for e in v if e["type"] == "metrics"]) for k, v in runs.items()}
    assert len(losses["fast"]) == len(losses["plain"]) == 50
    # bf16 rounds differently in the two paths (fused adds, fp32 accumulation of the head's
    # gradient), and 50 steps of training amplify it a little: per-step agreement within a few
    # percent, the curves' means within one.
    relative = (losses["fast"] - losses["plain"]).abs() / losses["plain"].abs().clamp_min(1e-3)
    assert float(relative.max()) < 0.05, relative
    assert float(relative.mean()) < 0.01, relative
    assert float(losses["fast"][-5:].mean()) < 0.7 * float(losses["fast"][:5].mean())  # it learned

    metrics = [e["data"] for e in runs["fast"] if e["type"] == "metrics"]
    assert all(m["peak_memory_bytes"] > 0 and 0 < m["mfu"] < 1 for m in metrics[1:])


def test_chunked_loss_holds_far_less_memory_than_whole_logits(tmp_path: Path):
    """A 32k vocabulary and 4 x 1024 tokens: whole logits and their fp32 copies are gigabytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.loss_heads import ChunkedLoss, PlainLoss, build_loss

    device = torch.device("cuda")
    config = LlamaConfig(vocab_size=32_000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(3, 32_000, (4, 1024))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def peak_of(loss_fn) -> int:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _, _ = loss_fn(model, batch, device)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    chunked = build_loss(model, device)
    assert isinstance(chunked, ChunkedLoss)
    plain_peak, chunked_peak = peak_of(PlainLoss()), peak_of(chunked)
    whole_logits_fp32 = ids.numel() * config.vocab_size * 4
    assert plain_peak > whole_logits_fp32
    assert chunked_peak < plain_peak - whole_logits_fp32, (plain_peak, chunked_peak)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cross_entropy_kernel_equals_the_torch_chunks(monkeypatch, dtype):
    """The one-kernel loss (trainer.ce_kernel) against the torch chunk loop it replaces on CUDA:
    same loss sum and correct count, gradients within the rounding of the logits' dtype."""
    from trainer import ce_kernel, linear_ce

    if not ce_kernel.available(dtype, torch.device("cuda")):
        pytest.fail("triton is missing on this CUDA host: the fast loss would silently fall back")
    torch.manual_seed(0)
    n, d, vocab = 3000, 256, 50_000  # not a multiple of the chunk or of the kernel's block
    h = torch.randn(n, d, device="cuda", requires_grad=True)
    w = (torch.randn(vocab, d, device="cuda") * 0.05).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda")
    got = {}
    for kernel in ("0", "1"):
        monkeypatch.setenv("TUNEQ_CE_KERNEL", kernel)
        h.grad = w.grad = None
        loss, correct = linear_ce.linear_cross_entropy(h, w, t, chunk=256, compute_dtype=dtype)
        loss.backward()
        got[kernel] = (loss.item(), correct.item(), h.grad.clone(), w.grad.clone())
    (l0, c0, gh0, gw0), (l1, c1, gh1, gw1) = got["0"], got["1"]
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert abs(c1 - c0) <= 1  # argmax ties may only differ where logits tie after rounding
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (gh1 - gh0).norm() <= tol * gh0.norm()
    assert (gw1 - gw0).norm() <= tol * gw0.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_backward_kernel_equals_autograd(dtype):
    """trainer.lora_mlp's in-place Triton pass: silu(a) * b into dc's buffer, the gradients of a
    and b into theirs, as autograd computes them (fp32 arithmetic, rounded once to dtype)."""
    from trainer.lora_mlp import _kernel_available, swiglu_back_in_place

    g = torch.Generator(device="cuda").manual_seed(0)
    a, b, dc = (torch.randn(4096, 1000, generator=g, device="cuda").mul_(3).to(dtype) for _ in range(3))
    assert _kernel_available(a)
    a_ref, b_ref = a.float().requires_grad_(), b.float().requires_grad_()
    c = torch.nn.functional.silu(a_ref) * b_ref
    c.backward(dc.float())
    swiglu_back_in_place(dc, a, b)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(dc.float(), c.detach(), **tol)
    torch.testing.assert_close(a.float(), a_ref.grad, **tol)
    torch.testing.assert_close(b.float(), b_ref.grad, **tol)


def test_a_training_batchs_4bit_products_are_bitsandbytes_own(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    """Above bitsandbytes' kernel rows the fused layers dequantize and multiply themselves instead
    of calling the 4-bit layer's forward: the same two kernels bitsandbytes runs there, so the same
    logits and gradients as through its forward."""
    import bitsandbytes as bnb

    from trainer import lora_fused
    from trainer.lora_mlp import fuse_lora_mlps
    from trainer.methods import apply_method
    from trainer.model import load_model
    from trainer.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(8, seed=1))
    spec = JobSpec.model_validate({"model": str(tiny_model_dir), "method": "qlora", "training_file": str(data),
                                   "lora": {"r": 16, "alpha": 32}})
    device = torch.device("cuda")
    model = apply_method(load_model(spec, "bf16", device), spec, checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert lora_fused.fuse_lora(model) == 14 and fuse_lora_mlps(model) == 2
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (4, 512), device=device)  # 2,048 rows
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.zeros(4, 512, layer.in_features, device=device, dtype=torch.bfloat16)
    assert lora_fused.own_4bit_product(layer, x, torch.bfloat16)
    assert not lora_fused.own_4bit_product(layer, x[:1, :256], torch.bfloat16)  # bitsandbytes' own kernel's rows

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    forward = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or forward(self, x))
    own_logits, own_grads = run()
    assert calls == []  # not one product went through the layer's forward
    monkeypatch.setattr(lora_fused, "OWN_PRODUCT_DEVICES", ())
    logits, grads = run()
    assert len(calls) == 14
    torch.testing.assert_close(own_logits, logits, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(own_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)

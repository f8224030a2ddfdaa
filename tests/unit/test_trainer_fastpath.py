"""The trainer's fast path: chunked LM-head cross-entropy, fused LoRA, speed modes, bf16 full
fine-tuning, MFU; and that it trains exactly like the plain loop (fp32 on a CPU)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.linear_ce import chunk_tokens, linear_cross_entropy
from trainer.loss_heads import ChunkedLoss, PlainLoss, build_loss


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| over the whole tensor: rounding in another summation order stays near
    1e-7 in fp32, a wrong formula is of order 1."""
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Chunked linear cross-entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_equals_cross_entropy_of_full_logits(chunk: int):
    torch.manual_seed(0)
    h = torch.randn(90, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (90,))
    loss, correct = linear_cross_entropy(h, w, t, chunk=chunk)
    (loss * 0.37).backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None

    logits = h @ w.t()
    ref = F.cross_entropy(logits, t, reduction="sum")
    (ref * 0.37).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert int(correct) == int((logits.argmax(-1) == t).sum())
    torch.testing.assert_close(got[0], h.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-6, atol=1e-8)


def test_linear_cross_entropy_frozen_head_and_no_grad():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)  # a frozen head: only the hidden states get a gradient
    t = torch.randint(0, 20, (10,))
    loss, _ = linear_cross_entropy(h, w, t, chunk=3)
    loss.backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        again, _ = linear_cross_entropy(h, w, t, chunk=3)
    assert not again.requires_grad and float(again) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_linear_cross_entropy_in_bf16_with_fp32_master_head():
    """The fp32_master case: the head is fp32, the matmuls bf16, its gradient accumulated in fp32."""
    torch.manual_seed(1)
    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(100, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 100, (64,))
    loss, _ = linear_cross_entropy(h, w, t, chunk=16, compute_dtype=torch.bfloat16)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    logits = (h.bfloat16() @ w.bfloat16().t()).float()  # what autocast gives the model's own head
    ref = F.cross_entropy(logits, t, reduction="sum")
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
    assert _relative_error(got[0], h.grad) < 1e-2 and _relative_error(got[1], w.grad) < 1e-2


def test_chunk_size_fits_the_budget():
    assert chunk_tokens(128_256) == 256  # 256 x 128256 x 4 B = 125 MiB <= 128 MiB
    assert chunk_tokens(768) == 8192  # capped
    assert chunk_tokens(128_256, budget_bytes=256 * 1024**2) == 512


class _LogitRows(TorchDispatchMode):
    """The most rows of vocabulary-wide values (logits, softmax, their gradients) that any op
    produces, forward or backward: a tensor whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.most = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view (the head's transpose) allocates nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == self.vocab:
                self.most = max(self.most, t.numel() // self.vocab)
        return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batch(vocab: int, rows: int = 8, length: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt: no loss there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_chunked_loss_never_allocates_tokens_by_vocab(tiny):
    """Fails if the loss goes back to whole logits: the plain loss's largest tensor is the logits."""
    vocab = tiny.config.vocab_size
    batch = _batch(vocab)
    tokens = batch["input_ids"].numel()
    head = build_loss(tiny, torch.device("cpu"))
    assert isinstance(head, ChunkedLoss)
    head.chunk = 32

    def logit_rows(loss_fn) -> int:
        tiny.zero_grad(set_to_none=True)
        with _LogitRows(vocab) as mode:
            loss, n, _ = loss_fn(tiny, batch, torch.device("cpu"))
            loss.backward()
        return mode.most

    assert logit_rows(PlainLoss()) >= tokens * 7 // 8  # the check does see whole logits
    assert logit_rows(head) <= 32, "some op held more than one chunk of tokens' logits"


def test_chunked_loss_matches_plain_loss_and_gradients(tiny):
    batch = _batch(tiny.config.vocab_size)
    results = []
    for loss_fn in (PlainLoss(), build_loss(tiny, torch.device("cpu"))):
        tiny.zero_grad(set_to_none=True)
        loss, n, correct = loss_fn(tiny, batch, torch.device("cpu"))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in tiny.parameters()])
        results.append((float(loss.detach()), int(n), int(correct), grads))
    (l0, n0, c0, g0), (l1, n1, c1, g1) = results
    assert n0 == n1 == 8 * (96 - 10) and c0 == c1
    assert l1 == pytest.approx(l0, rel=1e-5)
    # Summed (not averaged) losses: gradients are large, and fp32 sums in another order differ
    # by rounding in the last digits, nowhere near what a wrong gradient would.
    assert _relative_error(g1, g0) < 1e-5


def test_model_whose_logits_are_not_the_heads_output_keeps_the_plain_loss(tiny):
    model = copy.deepcopy(tiny)
    # Like a model that soft-caps or scales its logits after the head.
    model.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out["logits"] * 0.5) or out)
    assert isinstance(build_loss(model, torch.device("cpu")), PlainLoss)
    assert isinstance(build_loss(tiny, torch.device("cpu"), chunked=False), PlainLoss)


# --------------------------------------------------------------------------------------------
# Fused LoRA


def _lora(model, **settings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", **settings)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero; make the adapter matter
    return peft_model


@pytest.mark.parametrize("settings", [{}, {"use_rslora": True}])
def test_fused_lora_equals_peft(tiny, settings):
    from trainer.lora_fused import fuse_lora

    reference = _lora(tiny, **settings)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 14  # 7 linears x 2 layers
    batch = _batch(tiny.config.vocab_size, rows=2, length=20)
    outs = []
    for model in (reference, fused):
        logits = model(input_ids=batch["input_ids"]).logits
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for name, grad in outs[0][1].items():
        assert _relative_error(outs[1][1][name], grad) < 1e-5, name


def test_fused_lora_leaves_dora_and_dropout_to_peft(tiny):
    from trainer.lora_fused import fuse_lora

    assert fuse_lora(_lora(tiny, use_dora=True)) == 0
    assert fuse_lora(_lora(tiny, lora_dropout=0.1)) == 0


def _grads_after(model, batch, checkpointing: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    logits = model(input_ids=batch["input_ids"]).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lora_mlp_equals_peft(tiny, checkpointing: bool):
    """The whole SwiGLU MLP as one function (trainer.lora_mlp): the same logits and adapter
    gradients as peft's three layers, also when a checkpointed layer recomputes it."""
    from trainer.lora_fused import fuse_lora
    from trainer.lora_mlp import fuse_lora_mlps

    reference = _lora(tiny)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 14 and fuse_lora_mlps(fused) == 2
    batch = _batch(tiny.config.vocab_size, rows=2, length=20)
    want, grads = _grads_after(reference, batch, checkpointing)
    got, fused_grads = _grads_after(fused, batch, checkpointing)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert _relative_error(fused_grads[name], grad) < 1e-5, name


def test_swiglu_backward_in_place_equals_autograd():
    from trainer.lora_mlp import swiglu_back_in_place

    g = torch.Generator().manual_seed(0)
    a, b, dc = (torch.randn(64, 48, generator=g) * 3 for _ in range(3))
    a_ref, b_ref = a.clone().requires_grad_(), b.clone().requires_grad_()
    c = F.silu(a_ref) * b_ref
    c.backward(dc)
    swiglu_back_in_place(dc, a, b)
    torch.testing.assert_close(dc, c.detach())
    torch.testing.assert_close(a, a_ref.grad)
    torch.testing.assert_close(b, b_ref.grad)


def test_fused_lora_mlp_leaves_other_mlps_alone(tiny):
    from trainer.lora_mlp import fuse_lora_mlps

    assert fuse_lora_mlps(_lora(tiny, lora_dropout=0.1)) == 0  # peft's dropout path
    from peft import LoraConfig, get_peft_model

    some = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=8, target_modules=["q_proj", "gate_proj", "up_proj"]))
    assert fuse_lora_mlps(some) == 0  # down_proj not adapted


def _qlora_reference(make_spec):
    from trainer.methods import apply_method
    from trainer.model import load_model

    spec = make_spec("qlora")
    reference = apply_method(load_model(spec, "fp32", torch.device("cpu")), spec)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return reference


@pytest.mark.parametrize("train_mode", [False, True])
def test_fused_lora_on_a_4bit_base_equals_peft(tiny_model_dir: Path, make_spec, train_mode: bool):
    """The base's product must be bitsandbytes' own, whichever kernel it picks. As loaded, the
    4-bit layers are in eval mode and the first layer's q/k/v input needs no gradient: on a CPU with
    AVX512-BF16 bitsandbytes repacks those weights and multiplies in bf16 (differences of ~1e-2 from
    an fp32 dequantize + matmul); in train mode it dequantizes and multiplies in fp32."""
    from trainer.lora_fused import fuse_lora

    reference = _qlora_reference(make_spec)
    if train_mode:
        reference.train()
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 14
    ids = _batch(reference.config.vocab_size, rows=2, length=16)["input_ids"]
    a = reference(input_ids=ids).logits
    b = fused(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    ga = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            assert _relative_error(p.grad, ga[n]) < 1e-4, n


def test_fused_lora_mlp_on_a_4bit_base_equals_peft(tiny_model_dir: Path, make_spec):
    from trainer.lora_fused import fuse_lora
    from trainer.lora_mlp import fuse_lora_mlps

    reference = _qlora_reference(make_spec)
    fused = copy.deepcopy(reference)
    assert fuse_lora(fused) == 14 and fuse_lora_mlps(fused) == 2
    batch = _batch(reference.config.vocab_size, rows=2, length=16)
    want, grads = _grads_after(reference, batch)
    got, fused_grads = _grads_after(fused, batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        assert _relative_error(fused_grads[name], grad) < 1e-4, name


def test_an_adapters_compute_copy_is_made_once_per_optimizer_step():
    from trainer.lora_fused import adapter_weight, weights_stepped

    w = torch.nn.Parameter(torch.randn(4, 8))
    first = adapter_weight(w, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, w.detach().to(torch.bfloat16))
    assert adapter_weight(w, torch.bfloat16) is first  # the recompute and the backward read it
    assert adapter_weight(w, torch.float32) is w
    with torch.no_grad():
        w.add_(1.0)  # an in-place change bumps the version counter
    second = adapter_weight(w, torch.bfloat16)
    assert second is not first and torch.equal(second, w.detach().to(torch.bfloat16))
    w.data = torch.zeros(4, 8)  # a new storage
    assert torch.equal(adapter_weight(w, torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))
    third = adapter_weight(w, torch.bfloat16)
    weights_stepped()  # what a fused optimizer's step cannot tell by the counter
    assert adapter_weight(w, torch.bfloat16) is not third


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_4bit_equals_bitsandbytes(make_spec, double_quant: bool):
    """The layers' own dequantization (through bitsandbytes' ops) is bit for bit bitsandbytes'
    functional one, with the block scales double-quantized or not."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from trainer.lora_fused import _dequantize_4bit

    weight = torch.randn(48, 64)
    layer = bnb.nn.Linear4bit(64, 48, bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
    state = layer.weight.quant_state
    assert state is not None and state.nested == double_quant
    got = _dequantize_4bit(layer.weight)
    assert torch.equal(got, bnbf.dequantize_4bit(layer.weight.data, state))
    assert _relative_error(got, weight) < 0.2  # 4 bits: close, not equal


@pytest.mark.parametrize("mlp", [False, True])
def test_own_4bit_product_equals_the_layers_forward(tiny_model_dir: Path, make_spec, monkeypatch, mlp: bool):
    """Above bitsandbytes' kernel rows on a GPU the fused layers dequantize and multiply
    themselves, which must give what the 4-bit layer's own forward gives. Here on the CPU (which
    the layers do not take that path on), with the rows lowered: bitsandbytes' CPU product of a
    training input is also dequantize + matmul, so the two agree to rounding."""
    import bitsandbytes as bnb

    from trainer import lora_fused
    from trainer.lora_mlp import fuse_lora_mlps

    reference = _qlora_reference(make_spec)
    reference.train()
    own = copy.deepcopy(reference)
    assert lora_fused.fuse_lora(reference) == 14 and lora_fused.fuse_lora(own) == 14
    if mlp:
        assert fuse_lora_mlps(reference) == 2 and fuse_lora_mlps(own) == 2
    batch = _batch(reference.config.vocab_size, rows=2, length=16)
    want, grads = _grads_after(reference, batch)

    def not_called(*args, **kwargs):
        raise AssertionError("the 4-bit layer's own forward ran")

    monkeypatch.setattr(lora_fused, "OWN_PRODUCT_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(lora_fused, "BNB_KERNEL_ROWS", 31)  # 2 x 16 rows: above it
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", not_called)
    got, own_grads = _grads_after(own, batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        assert _relative_error(own_grads[name], grad) < 1e-4, name


def test_fused_lora_backward_on_a_4bit_weight_repacked_for_the_cpu(tiny_model_dir: Path, make_spec):
    """On an AVX512-BF16 CPU an eval-mode forward on an input without gradient (a validation pass)
    makes bitsandbytes repack the 4-bit weight for its bf16 kernel, which has no backward; the fused
    backward dequantizes through bitsandbytes' inverse of that packing, leaving the layer packed."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from trainer.lora_fused import _dense_weight

    layer = next(m for m in _qlora_reference(make_spec).modules() if isinstance(m, bnb.nn.Linear4bit))
    before = _dense_weight(layer.weight, torch.float32)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, layer.in_features))
    state = layer.weight.quant_state
    if not bnbf.has_avx512bf16():
        # Not a skip (CI allows none): without AVX512-BF16 bitsandbytes keeps its own layout, and
        # the dense weight is read as before.
        assert not getattr(state, "packing_format_for_cpu", False)
        assert torch.equal(_dense_weight(layer.weight, torch.float32), before)
        return
    assert state.packing_format_for_cpu
    after = _dense_weight(layer.weight, torch.float32)
    assert state.packing_format_for_cpu and layer.weight.quant_state is state
    # The packing keeps the block scales in bf16 (relative error up to 2^-9; measured 1e-3); a
    # dequantization of the packed layout as if it were the plain one is wrong by order 1.
    assert _relative_error(after, before) < 5e-3


# --------------------------------------------------------------------------------------------
# Equivalence with the plain loop over 50 steps (fp32 on a CPU: the numbers must agree closely)


@pytest.mark.parametrize(("method", "fused_layers"), [("lora", 14), ("full", 0)])
def test_fast_path_trains_like_the_plain_loop(make_spec, tmp_path: Path, monkeypatch, method: str, fused_layers: int):
    from trainer.job import run_job

    hp = {"max_steps": 50, "batch_size": 2, "max_seq_len": 48, "learning_rate": 3e-3 if method == "lora" else 1e-3}
    runs = {}
    for name, env in (("plain", "0"), ("fast", "1")):
        monkeypatch.setenv("TUNEQ_FASTPATH", env)
        monkeypatch.setenv("TUNEQ_CE_CHUNK_TOKENS", "16")  # several chunks per micro-batch
        out = tmp_path / name
        assert run_job(make_spec(method, hyperparameters=hp, schedule={"log_every_steps": 1}), out) == 0
        runs[name] = _events(out)
    start = next(e["data"] for e in runs["fast"] if e["type"] == "start")
    assert start["fast_path"]["loss"] == "chunked" and start["fast_path"]["loss_chunk_tokens"] == 16
    assert start["fast_path"]["fused_lora_layers"] == fused_layers
    assert start["fast_path"]["speed"] == "fast" and start["fast_path"]["gradient_checkpointing"] is False
    assert next(e["data"] for e in runs["plain"] if e["type"] == "start")["fast_path"]["loss"] == "plain"

    losses = {k: [e["data"]["train_loss"] for e in v if e["type"] == "metrics"] for k, v in runs.items()}
    assert len(losses["fast"]) == 50
    assert losses["fast"][-1] < 0.8 * losses["fast"][0]  # it trained
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["plain"]), rtol=2e-4, atol=1e-5)

    metrics = [e["data"] for e in runs["fast"] if e["type"] == "metrics"]
    plain_metrics = [e["data"] for e in runs["plain"] if e["type"] == "metrics"]
    assert all(m["mfu"] is None and m["peak_memory_bytes"] is None for m in metrics)  # a CPU has no peak
    assert all(0.0 <= m["train_mean_token_accuracy"] <= 1.0 for m in metrics)
    assert [m["train_mean_token_accuracy"] for m in metrics[:5]] == [m["train_mean_token_accuracy"] for m in plain_metrics[:5]]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; these tests need bf16 while the
    others ran with none, so the state is cleared before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("method", "extra"), [("lora", {}), ("lora", {"optimizer": "adamw_fused", "speed": "lean"}),
                                              ("full", {"full_precision": "fp32_master"})])
def test_fast_path_under_bf16_autocast_stays_within_bf16_noise(make_spec, tmp_path: Path, monkeypatch, method, extra):
    """precision bf16 on a CPU runs under CPU autocast, as a GPU job does: the fused LoRA and the
    chunked head compute in bf16 (with fp32 master weights the head is fp32 and its matmul bf16).
    The fused AdamW (a GPU's default) changes the weights without bumping their version counters:
    the fused layers' bf16 copies of the adapters must still follow every step, through the
    forward, its recompute under checkpointing and the backward."""
    from trainer.job import run_job

    hp = {"max_steps": 20, "batch_size": 2, "max_seq_len": 48, "learning_rate": 3e-3 if method == "lora" else 1e-4}
    losses = {}
    for name, env in (("plain", "0"), ("fast", "1")):
        monkeypatch.setenv("TUNEQ_FASTPATH", env)
        monkeypatch.setenv("TUNEQ_CE_CHUNK_TOKENS", "16")
        out = tmp_path / name
        assert run_job(make_spec(method, hyperparameters=hp, precision="bf16", **extra), out) == 0
        losses[name] = torch.tensor([e["data"]["train_loss"] for e in _events(out) if e["type"] == "metrics"])
    relative = (losses["fast"] - losses["plain"]).abs() / losses["plain"]
    # bf16 keeps 8 bits of mantissa (0.4 %); two summation orders differ by about that, not more.
    assert float(relative.max()) < 0.01 and float(relative.mean()) < 0.003, relative


# --------------------------------------------------------------------------------------------
# Speed modes and full-fine-tuning precision


def test_speed_decides_gradient_checkpointing(make_spec):
    from trainer.fastpath import resolve_speed, setup_model

    cpu = torch.device("cpu")
    assert resolve_speed(make_spec("lora"), cpu) == "fast"  # auto on a CPU
    model, fast = setup_model(make_spec("lora", speed="lean"), "fp32", cpu)
    assert fast.speed == "lean" and fast.gradient_checkpointing
    assert model.base_model.model.model.layers[0].gradient_checkpointing
    model, fast = setup_model(make_spec("lora", speed="fast"), "fp32", cpu)
    assert not fast.gradient_checkpointing and not model.base_model.model.model.layers[0].gradient_checkpointing
    # The old name still works and is the same choice.
    assert make_spec("lora", gradient_checkpointing=True).speed == "lean"
    assert make_spec("lora", gradient_checkpointing=False).speed == "fast"


def test_speed_and_checkpointing_must_agree_and_prefix_cannot_be_lean(make_spec):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gradient_checkpointing: false means speed 'fast'"):
        make_spec("lora", speed="lean", gradient_checkpointing=False)
    with pytest.raises(ValidationError, match="speed: 'lean'.*prefix"):
        make_spec("prefix", speed="lean")
    spec = make_spec("lora", speed="lean")
    assert type(spec).model_validate(spec.model_dump()).speed == "lean"


@pytest.mark.parametrize(("full_precision", "dtype"), [("fp32_master", torch.float32), ("bf16", torch.bfloat16)])
def test_full_precision_sets_the_weights_dtype(make_spec, full_precision: str, dtype: torch.dtype):
    from trainer.model import load_model
    from trainer.optim import build_optimizer

    spec = make_spec("full", full_precision=full_precision)
    model = load_model(spec, "bf16", torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {dtype}
    # AdamW keeps its state in the parameters' dtype: bf16 state for bf16 weights.
    model.train()
    model(input_ids=torch.tensor([[1, 5, 9, 12]]), labels=torch.tensor([[1, 5, 9, 12]])).loss.backward()
    optimizer = build_optimizer(model, spec, torch.device("cpu"))
    optimizer.step()
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {dtype}
    # Adapter methods keep a bf16 base whatever full_precision says.
    assert next(load_model(make_spec("lora"), "bf16", torch.device("cpu")).parameters()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# FLOPs and MFU


@pytest.mark.parametrize("method", ["full", "lora"])
def test_model_flops_agree_with_the_planner(tiny, method: str):
    from trainer.planning import estimate_compute
    from trainer.spec import LoraSettings
    from trainer.throughput import model_flops

    model = tiny if method == "full" else _lora(tiny)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    ours = model_flops(model).per_token(seq_len=512)
    planned = estimate_compute(tiny.config, method=method, tokens=1, seq_len=512, lora=LoraSettings(r=8)).flops_per_token
    assert ours == pytest.approx(planned, rel=1e-9)


def test_mfu_uses_the_configured_peak(monkeypatch):
    from trainer.throughput import ModelFlops, mfu, peak_flops

    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("TUNEQ_GPU_PEAK_TFLOPS", "100")
    assert peak_flops(torch.device("cuda")) == 100e12
    flops = ModelFlops(matmul_weights=10**9, trainable_matmul_weights=10**9, layers=0, attention_width=0)
    assert mfu(flops, 10_000, 2048, 100e12, devices=2) == pytest.approx(6e9 * 1e4 / 200e12)


def test_speed_auto_on_a_gpu_takes_fast_only_when_the_plan_fits(monkeypatch):
    from types import SimpleNamespace

    from trainer.fastpath import resolve_speed
    from trainer.spec import JobSpec
    from trainer.tiny import build_config

    spec = JobSpec(model="m", training_file="t", method="lora", hyperparameters={"batch_size": 8, "max_seq_len": 2048})
    config, gpu = build_config("llama-3.2-1b"), torch.device("cuda")
    # 16 GiB: fast (about 22 GiB) does not fit, lean (about 5) leaves room for some whole layers.
    for gib, speed in ((4, "lean"), (16, "balanced"), (141, "fast")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, gib=gib: SimpleNamespace(total_memory=gib * 2**30))
        assert resolve_speed(spec, gpu, config) == speed, gib
    assert resolve_speed(spec.model_copy(update={"method": "prefix"}), gpu, config) == "fast"
    assert resolve_speed(spec.model_copy(update={"speed": "lean"}), gpu, config) == "lean"  # explicit wins


# --------------------------------------------------------------------------------------------
# Speed balanced: checkpointing on the bottom k decoder layers only


def _layer_runs(model) -> list[int]:
    """Calls of each decoder layer's MLP: the recompute in backward calls it again. A pre-hook,
    because the layer's own hooks sit outside transformers' checkpoint and the recompute stops
    (torch's early stop) inside the MLP, before a forward hook would run."""
    from trainer.methods import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    runs = [0] * len(decoder_layers(base))
    for i, layer in enumerate(decoder_layers(base)):
        layer.mlp.register_forward_pre_hook(lambda *_a, i=i: runs.__setitem__(i, runs[i] + 1))
    return runs


@pytest.mark.parametrize("method", ["full", "lora"])
def test_balanced_checkpoints_only_the_bottom_layers_and_trains_like_fast(make_spec, method: str):
    from trainer.fastpath import setup_model

    cpu = torch.device("cpu")
    losses, runs = {}, {}
    for name, extra in (("fast", {"speed": "fast"}), ("balanced", {"speed": "balanced", "checkpoint_layers": 1})):
        torch.manual_seed(0)  # the same LoRA init in both
        model, fast = setup_model(make_spec(method, **extra), "fp32", cpu)
        model.train()
        counts = _layer_runs(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = _batch(model.config.vocab_size, rows=2, length=32)
        got = []
        for _ in range(4):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            got.append(float(loss.detach()))
        losses[name], runs[name] = torch.tensor(got), counts
        if name == "balanced":
            assert fast.speed == "balanced" and fast.gradient_checkpointing and fast.checkpointed_layers == 1
    layers = len(runs["fast"])
    assert layers >= 2
    assert runs["fast"] == [4] * layers
    # Layer 0 runs again in every backward; the layers above it run once.
    assert runs["balanced"] == [8] + [4] * (layers - 1)
    assert losses["fast"][-1] < losses["fast"][0]  # it trains
    torch.testing.assert_close(losses["balanced"], losses["fast"], rtol=1e-5, atol=1e-6)


def test_balanced_checkpoint_layers_spec_rules(make_spec):
    from pydantic import ValidationError

    from trainer.errors import ConfigError
    from trainer.fastpath import resolve_checkpointing, setup_model

    assert make_spec("lora", checkpoint_layers=3).speed == "balanced"  # auto with a count is balanced
    assert make_spec("lora", speed="balanced").gradient_checkpointing is None
    with pytest.raises(ValidationError, match="checkpoint_layers: applies to speed 'balanced'"):
        make_spec("lora", speed="lean", checkpoint_layers=3)
    with pytest.raises(ValidationError, match="gradient_checkpointing"):
        make_spec("lora", speed="balanced", gradient_checkpointing=True)
    with pytest.raises(ValidationError, match="speed: 'balanced'.*prefix"):
        make_spec("prefix", speed="balanced")
    with pytest.raises(ValidationError, match="checkpoint_layers"):
        make_spec("lora", checkpoint_layers=-1)
    spec = make_spec("lora", checkpoint_layers=1)
    assert type(spec).model_validate(spec.model_dump()).checkpoint_layers == 1
    # On a CPU balanced without a count checkpoints nothing (the memory is the host's).
    assert resolve_checkpointing(make_spec("lora", speed="balanced"), torch.device("cpu")) == ("balanced", 0)
    with pytest.raises(ConfigError, match="checkpoint_layers: 9 exceeds the model's 2 decoder layers"):
        setup_model(make_spec("lora", checkpoint_layers=9), "fp32", torch.device("cpu"))

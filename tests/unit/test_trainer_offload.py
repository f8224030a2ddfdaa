"""checkpoint_offload: checkpointed layers' inputs wait in host memory (trainer.offload).

On a CPU the tensors are host memory already; the tests make the hooks copy anyway
(copy_on_host) and offload every size (min_bytes 0), so the packing, the copies and the
restore before the recompute run as on a GPU, short of the streams.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint


def _batch(vocab: int, rows: int = 2, length: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train(make_spec, steps: int = 4, offload_everything: bool = True, **extra):
    """(losses, gradients of every step, fast path, packs per step) of a few CPU fp32 steps."""
    from trainer.fastpath import setup_model

    torch.manual_seed(0)  # the same LoRA init in every run
    model, fast = setup_model(make_spec("lora", **extra), "fp32", torch.device("cpu"))
    if fast.offload is not None and offload_everything:
        fast.offload.min_bytes = 0
        fast.offload.copy_on_host = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = _batch(model.config.vocab_size)
    losses, grads, packs = [], [], []
    for _ in range(steps):
        if fast.offload is not None:
            fast.offload.reset_counts()
        loss = model(**batch).loss
        loss.backward()
        if fast.offload is not None:
            packs.append((fast.offload.packed, fast.offload.unpacked, fast.offload.kept_parameters))
        grads.append([p.grad.detach().clone() for p in params])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return torch.tensor(losses), grads, fast, packs


def test_offload_trains_exactly_like_lean_and_packs_one_input_per_checkpointed_layer(make_spec):
    plain_losses, plain_grads, plain_fast, _ = _train(make_spec, speed="lean")
    losses, grads, fast, packs = _train(make_spec, speed="lean", checkpoint_offload=True)
    assert plain_fast.offload is None and plain_fast.describe()["checkpoint_offload"] is False
    assert fast.describe()["checkpoint_offload"] is True and fast.speed == "lean"
    layers = fast.checkpointed_layers
    assert layers == 2
    # Every checkpointed layer's input went out once in forward and came back once for its recompute;
    # the hooks saw no weight (non-reentrant checkpointing saves only the layer's inputs outside it).
    assert packs == [(layers, layers, 0)] * 4
    assert plain_losses[-1] < plain_losses[0]  # it trains
    torch.testing.assert_close(losses, plain_losses, rtol=0, atol=1e-6)
    for got, want in zip(grads, plain_grads, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_offload_with_balanced_moves_only_the_checkpointed_layers_inputs(make_spec):
    ref_losses, ref_grads, _, _ = _train(make_spec, steps=3, speed="balanced", checkpoint_layers=1)
    losses, grads, fast, packs = _train(make_spec, steps=3, speed="balanced", checkpoint_layers=1,
                                        checkpoint_offload=True)
    assert fast.checkpointed_layers == 1
    assert packs == [(1, 1, 0)] * 3
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_offload_hooks_copy_what_they_pack_and_skip_weights_and_small_tensors():
    from trainer.offload import CheckpointOffload

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    offload = CheckpointOffload(lin, min_bytes=1024, copy_on_host=True)
    seen: list[torch.Tensor] = []
    pack = offload.pack
    offload.pack = lambda t: (seen.append(t), pack(t))[1]  # type: ignore[method-assign]

    def layer(x, weight, small):
        return torch.tanh(torch.nn.functional.linear(x, weight) * small)

    x = torch.randn(8, 64, requires_grad=True)  # 2 KiB: offloaded
    small = torch.randn(64, requires_grad=True)  # 256 bytes: stays
    w_t = lin.weight.t()  # a view of a weight, passed as an input: stays
    with offload.hooks():
        out = checkpoint(layer, x, w_t.t(), small, use_reentrant=False)
        out2 = checkpoint(layer, x * 2, lin.weight, small, use_reentrant=False)
    assert len(seen) == 6
    assert (offload.packed, offload.kept_parameters, offload.kept_small) == (2, 2, 2)
    (out.sum() + out2.sum()).backward()
    assert offload.unpacked == 2
    grads = [t.grad.clone() for t in (x, small, lin.weight)]

    for t in (x, small, lin.weight):
        t.grad = None
    (layer(x, lin.weight, small).sum() + layer(x * 2, lin.weight, small).sum()).backward()
    for got, t in zip(grads, (x, small, lin.weight), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=0, atol=0)


def test_offload_chain_restarts_after_a_backward():
    """The copy back prefetches the input packed before, but never one of an earlier graph."""
    from trainer.offload import CheckpointOffload

    offload = CheckpointOffload(min_bytes=0)
    a, b, c = (torch.randn(4, requires_grad=True) for _ in range(3))
    ra, rb = offload.pack(a), offload.pack(b)
    assert rb.prev() is ra and ra.prev is None
    offload.unpack(rb)
    rc = offload.pack(c)
    assert rc.prev is None


def test_checkpoint_offload_spec_rules(make_spec):
    from pydantic import ValidationError

    assert make_spec("lora", speed="lean", checkpoint_offload=True).checkpoint_offload
    assert make_spec("lora", gradient_checkpointing=True, checkpoint_offload=True).speed == "lean"
    assert make_spec("lora", checkpoint_layers=1, checkpoint_offload=True).speed == "balanced"
    assert make_spec("lora", speed="balanced", checkpoint_offload=True).checkpoint_offload  # the trainer picks k
    for extra in ({"speed": "fast"}, {"speed": "auto"}, {}, {"gradient_checkpointing": False}):
        with pytest.raises(ValidationError, match="checkpoint_offload: .*speed 'lean' or 'balanced'"):
            make_spec("lora", checkpoint_offload=True, **extra)
    with pytest.raises(ValidationError, match="checkpoint_offload: checkpoint_layers 0"):
        make_spec("lora", speed="balanced", checkpoint_layers=0, checkpoint_offload=True)
    with pytest.raises(ValidationError, match="checkpoint_offload"):
        make_spec("lora", speed="lean", checkpoint_offload="sometimes")
    spec = make_spec("qlora", speed="lean", checkpoint_offload=True)
    assert type(spec).model_validate(spec.model_dump()).checkpoint_offload is True


def test_a_job_with_offload_reports_it_and_trains_like_lean(make_spec, tmp_path: Path):
    from trainer.job import run_job

    losses = {}
    for name, extra in (("lean", {}), ("offload", {"checkpoint_offload": True})):
        out = tmp_path / name
        spec = make_spec("lora", speed="lean", hyperparameters={"max_steps": 4, "batch_size": 2, "max_seq_len": 32},
                         **extra)
        assert run_job(spec, out) == 0
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        start = next(e["data"] for e in events if e["type"] == "start")
        assert start["fast_path"]["checkpoint_offload"] is (name == "offload")
        losses[name] = [e["data"]["train_loss"] for e in events if e["type"] == "metrics"]
    assert len(losses["offload"]) == 4 and losses["offload"] == losses["lean"]

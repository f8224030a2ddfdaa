"""optimizer_in_backward: each decoder layer is updated, and its gradients freed, inside backward.

The tiny model has tied embeddings, so every test also covers a shared parameter, which must wait
for the ordinary step().
"""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from trainer.events import read_events
from trainer.job import run_job
from trainer.optim_in_backward import OptimizerInBackward, layer_of

NO_CLIP = {"max_steps": 6, "batch_size": 4, "max_seq_len": 32, "warmup_steps": 1, "max_grad_norm": 0.0,
           "learning_rate": 3e-3}


def _batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _model_and_optimizer(make_spec, in_backward: bool, **top):
    from trainer.fastpath import setup_model
    from trainer.optim import build_optimizer

    spec = make_spec("full", hyperparameters=NO_CLIP, optimizer_in_backward=in_backward, **top)
    torch.manual_seed(0)
    model, _ = setup_model(spec, "fp32", torch.device("cpu"))
    model.train()
    return model, build_optimizer(model, spec, torch.device("cpu"))


def _live_layer_grads_during_backward(model) -> list[int]:
    """How many decoder-layer parameters hold a gradient, seen each time one arrives."""
    layer_params = [p for n, p in model.named_parameters() if layer_of(n) is not None]
    seen: list[int] = []
    for p in layer_params:
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(sum(q.grad is not None for q in layer_params)))
    return seen


def test_layer_names_and_buckets(make_spec):
    assert layer_of("model.layers.7.mlp.up_proj.weight") == "model.layers.7"
    assert layer_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0"
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None
    model, optimizer = _model_and_optimizer(make_spec, True)
    assert isinstance(optimizer, OptimizerInBackward)
    layers = model.config.num_hidden_layers
    assert optimizer.layer_buckets == layers
    # The tied embedding (two names, one tensor) and the final norm wait for step().
    rest = {id(p) for p in optimizer.rest.params}
    assert id(model.get_input_embeddings().weight) in rest and id(model.model.norm.weight) in rest
    assert len(rest) == 2


def test_trains_exactly_like_the_ordinary_step_and_frees_each_layers_gradients(make_spec):
    trained = {}
    for in_backward in (False, True):
        model, optimizer = _model_and_optimizer(make_spec, in_backward)
        live = _live_layer_grads_during_backward(model)
        per_layer = max(len(b.params) for b in optimizer.buckets) if in_backward else None
        losses, norms = [], []
        for step in range(5):
            live.clear()
            loss = model(**_batch(model.config.vocab_size, step)).loss
            loss.backward()
            if in_backward:
                # Never more than one layer's gradients at once, and none left when backward ends.
                assert max(live) <= per_layer, (max(live), per_layer)
                assert all(p.grad is None for n, p in model.named_parameters() if layer_of(n))
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
                assert max(live) == sum(1 for n, _ in model.named_parameters() if layer_of(n))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if in_backward:
                norms.append(optimizer.take_grad_norm())
            losses.append(float(loss))
        trained[in_backward] = (losses, torch.stack(norms), {n: p.detach().clone() for n, p in model.named_parameters()})
    (ref_losses, ref_norms, ref_weights), (losses, norms, weights) = trained[False], trained[True]
    assert ref_losses[-1] < ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trips_through_a_weights_only_load(make_spec):
    model, optimizer = _model_and_optimizer(make_spec, True)
    model(**_batch(model.config.vocab_size, 0)).loss.backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    _, fresh = _model_and_optimizer(make_spec, True)
    fresh.load_state_dict(saved)
    for a, b in zip(optimizer.buckets, fresh.buckets, strict=True):
        assert a.key == b.key
        for pa, pb in zip(a.params, b.params, strict=True):
            torch.testing.assert_close(b.optimizer.state[pb]["exp_avg"], a.optimizer.state[pa]["exp_avg"])
    plain = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="optimizer_in_backward"):
        fresh.load_state_dict(plain)


def test_two_uses_in_one_backward_are_summed_but_a_second_backward_is_refused(make_spec):
    model, optimizer = _model_and_optimizer(make_spec, True)
    reference, plain = _model_and_optimizer(make_spec, False)
    batch = _batch(model.config.vocab_size, 0)
    # One backward through two uses of every layer: autograd sums them before the hook runs.
    (model(**batch).loss + model(**batch).loss).backward()
    optimizer.step()
    (reference(**batch).loss + reference(**batch).loss).backward()
    plain.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    # Two backward passes before step() would accumulate: refused, not updated twice.
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="second gradient before step"):
        model(**batch).loss.backward()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_trainer_runs_and_resumes_with_it(make_spec, tmp_path, method):
    spec = make_spec(method, hyperparameters=NO_CLIP, optimizer_in_backward=True,
                     schedule={"checkpoint_every_steps": 3, "keep_checkpoints": 5})
    straight = tmp_path / "straight"
    assert run_job(spec, straight) == 0
    metrics = {e["data"]["step"]: e["data"] for e in read_events(straight / "events.jsonl") if e["type"] == "metrics"}
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert all(m["grad_norm"] > 0 for m in metrics.values())
    assert metrics[6]["train_loss"] < metrics[1]["train_loss"]
    start = next(e["data"] for e in read_events(straight / "events.jsonl") if e["type"] == "start")
    assert start["fast_path"]["optimizer_in_backward"] is True

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    assert run_job(spec, resumed, resume=True) == 0
    again = {e["data"]["step"]: e["data"] for e in read_events(resumed / "events.jsonl") if e["type"] == "metrics"}
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step]["train_loss"] == pytest.approx(metrics[step]["train_loss"], rel=1e-5, abs=1e-6)
        assert again[step]["grad_norm"] == pytest.approx(metrics[step]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize(("changes", "field", "reason"), [
    ({"hyperparameters": {"max_grad_norm": 1.0}}, "optimizer_in_backward", "max_grad_norm 0"),
    ({"hyperparameters": {"max_grad_norm": 0.0, "gradient_accumulation_steps": 2}}, "optimizer_in_backward",
     "gradient_accumulation_steps 1"),
    ({"hyperparameters": {"max_grad_norm": 0.0}, "optimizer": "adamw_8bit"}, "optimizer_in_backward", "adamw"),
    ({"hyperparameters": {"max_grad_norm": 0.0}, "strategy": "fsdp"}, "optimizer_in_backward", "one GPU"),
])
def test_spec_refuses_what_it_cannot_do(make_spec, changes, field, reason):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        make_spec("full", optimizer_in_backward=True, **changes)
    message = str(info.value)
    assert field in message and reason in message, message


def test_dropping_the_optimizer_frees_it_and_its_hooks_without_a_garbage_collection(make_spec):
    import gc
    import weakref

    model, optimizer = _model_and_optimizer(make_spec, True)
    model(**_batch(model.config.vocab_size, 0)).loss.backward()
    optimizer.step()
    gone = weakref.ref(optimizer)
    gc.disable()
    try:
        del optimizer
        # Its parameters' hooks held it strongly once: the AdamW state stayed until gc ran.
        assert gone() is None
    finally:
        gc.enable()
    # The hooks went with it: backward leaves the gradients alone, as without the setting.
    model(**_batch(model.config.vocab_size, 1)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())

"""The planner's optimizer-state memory against what each optimizer of trainer.optim allocates."""

from __future__ import annotations

import pytest
import torch

from trainer.planning import estimate_memory, model_shape
from trainer.spec import OPTIMIZERS, LoraSettings


def _config():
    from transformers import LlamaConfig

    # Every LoRA matrix has >= 4096 elements: bitsandbytes keeps smaller tensors' states in fp32.
    return LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    # bitsandbytes shares one quantization map among all states: count each storage once.
    seen = {t.data_ptr(): t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
            if torch.is_tensor(t) and t.numel() > 1}
    return sum(seen.values())


@pytest.mark.parametrize("spec_name", OPTIMIZERS)
def test_planned_optimizer_states_match_the_allocated_ones(spec_name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.optim import build_optimizer
    from trainer.spec import JobSpec

    config = _config()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=16, target_modules="all-linear"))
    spec = JobSpec(model="m", training_file="t", optimizer=spec_name)
    opt = build_optimizer(model, spec, torch.device("cpu"))
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.float().pow(2).mean().backward()
    opt.step()
    est = estimate_memory(model_shape(config), method="lora", batch_size=1, seq_len=4, lora=LoraSettings(r=16),
                          optimizer=spec_name, precision="fp32")
    got = _state_bytes(opt)
    assert est.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 8-bit states add one fp32 scale per 256 values (1.6 %).
    assert est.optimizer_states == pytest.approx(got, rel=0.03), (spec_name, est.optimizer_states, got)


def test_eight_bit_and_paged_notes():
    shape = model_shape(_config())
    by = {o: estimate_memory(shape, method="full", batch_size=1, seq_len=8, optimizer=o) for o in OPTIMIZERS}
    assert by["adamw_8bit"].optimizer_states * 2 == by["adamw"].optimizer_states  # bf16 m, v: 4 B vs 2 B
    assert by["paged_adamw"].optimizer_states == 4 * by["paged_adamw_8bit"].optimizer_states
    assert any("paged" in n for n in by["paged_adamw"].notes)
    with pytest.raises(ValueError, match="optimizer: 'sgd' is not one of"):
        estimate_memory(shape, method="full", batch_size=1, seq_len=8, optimizer="sgd")

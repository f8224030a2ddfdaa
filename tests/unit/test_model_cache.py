"""The inference server's model cache: one base shared by many adapters, LRU eviction, and the
streamed generation (stop sequences, finish reasons) on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.inference import ChatRequest, Target
from worker.generation import generate
from worker.model_cache import ModelCache, Weights


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it changes the base's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0, -1]


def test_two_adapters_share_one_loaded_base(tiny_model_dir, adapters):
    base = str(tiny_model_dir)
    cache = ModelCache(max_adapters=4)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with cache.lease(base) as (model, _):
        plain = logits(model, ids)
        base_model = model
    with cache.lease(base, Weights("ftjob-a", adapters[0])) as (model, _):
        first = logits(model, ids)
        wrapper = model
    with cache.lease(base, Weights("ftjob-b", adapters[1])) as (model, _):
        second = logits(model, ids)
        assert model is wrapper  # the same PeftModel, another active adapter
    assert cache.loads == [base]  # the base came from disk once, for all three answers
    assert wrapper.get_base_model() is base_model
    assert set(wrapper.peft_config) == {"ftjob-a", "ftjob-b"}
    assert not torch.allclose(first, plain) and not torch.allclose(second, plain) and not torch.allclose(first, second)
    # Each answer is what that adapter alone gives, and the base still answers as itself.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapters[1])).eval()
    with torch.inference_mode():
        assert torch.allclose(second, logits(alone, ids), atol=1e-5)
    with cache.lease(base, Weights("ftjob-a", adapters[0])) as (model, _):
        assert torch.allclose(logits(model, ids), first, atol=1e-6)
    with cache.lease(base) as (model, _):
        assert torch.allclose(logits(model, ids), plain, atol=1e-6)


def test_least_recently_used_adapter_is_dropped(tiny_model_dir, adapters):
    base = str(tiny_model_dir)
    cache = ModelCache(max_adapters=2)
    for key, path in (("a", adapters[0]), ("b", adapters[1]), ("a", adapters[0]), ("c", adapters[2])):
        with cache.lease(base, Weights(key, path)):
            pass
    assert cache.stats()["adapters"] == {base: ["a", "c"]}  # b was used least recently
    assert cache.loads == [base]


def test_a_full_model_loads_as_its_own(tiny_model_dir, tmp_path):
    import shutil

    full = tmp_path / "final"
    shutil.copytree(tiny_model_dir, full)
    cache = ModelCache(max_models=1)
    with cache.lease(str(tiny_model_dir), Weights("ftjob-full", full)) as (model, _):
        assert not hasattr(model, "peft_config")
    assert cache.loads == ["ftjob-full"] and cache.stats()["bases"] == []


class Sink:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict]] = []

    def send(self, kind: str, **data) -> None:
        self.entries.append((kind, data))

    def error(self, status: int, message: str, param: str | None = None, code: str = "x") -> None:
        self.send("error", status=status, message=message, param=param)

    def cancelled(self) -> bool:
        return False

    def text(self) -> str:
        return "".join(d["content"] for k, d in self.entries if k == "delta")


def request(tiny: Path, max_tokens: int = 12, stop: list[str] | None = None, context: int | None = 2048) -> ChatRequest:
    return ChatRequest(id="r", target=Target(model="tiny-llama", base=str(tiny), context=context),
                       messages=[{"role": "user", "content": "Reverse: apple"}], max_tokens=max_tokens,
                       temperature=0.0, top_p=1.0, stop=stop or [], seed=None, deadline=0)


def test_generation_streams_deltas_and_honours_stop_sequences(tiny_model_dir):
    cache = ModelCache()
    with cache.lease(str(tiny_model_dir)) as (model, tok):
        whole = Sink()
        generate(model, tok, request(tiny_model_dir), whole)
        kinds = [k for k, _ in whole.entries]
        assert kinds[0] == "start" and kinds[-1] == "end" and "delta" in kinds
        end = whole.entries[-1][1]
        assert end["finish_reason"] == "length" and end["completion_tokens"] == 12
        text = whole.text()
        assert len(text) > 3
        # Greedy decoding is deterministic: a stop sequence from inside the answer cuts it there.
        cut = Sink()
        generate(model, tok, request(tiny_model_dir, stop=[text[2:4]]), cut)
        assert cut.text() == text[: text.index(text[2:4])]
        assert cut.entries[-1][1]["finish_reason"] == "stop"
        # A prompt the context cannot hold is refused naming messages, before any token.
        short = Sink()
        generate(model, tok, request(tiny_model_dir, context=4), short)
        assert short.entries == [("error", {"status": 400, "message": short.entries[0][1]["message"], "param": "messages"})]

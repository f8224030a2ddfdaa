"""Preference tuning: the spec's fields and checks, preference lines, the chunked per-row
log-probabilities, and DPO, SimPO and ORPO learning a preference on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.unit.conftest import write_jsonl
from trainer.spec import JobSpec

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "maple", "robot", "candle",
         "forest", "silver", "garden", "pencil", "rocket", "window", "bridge", "yellow", "castle"]


def pairs(n: int, seed: int) -> list[dict]:
    """The reversed word preferred over the word as given (the answer a copying model gives)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(WORDS)
        out.append({"input": {"messages": [{"role": "user", "content": f"Reverse: {w}"}]},
                    "preferred_output": [{"role": "assistant", "content": w[::-1]}],
                    "non_preferred_output": [{"role": "assistant", "content": w}]})
    return out


def _spec(**top) -> JobSpec:
    return JobSpec.model_validate({"model": "m", "training_file": "t.jsonl", **top})


# --- the spec -------------------------------------------------------------------------------------


def test_beta_auto_resolves_per_objective_and_survives_a_dump():
    assert _spec(objective="dpo").beta() == 0.1
    simpo = _spec(objective="simpo")
    assert (simpo.beta(), simpo.gamma()) == (2.0, 1.0)
    assert _spec(objective="orpo", preference={"beta": 0.5}).beta() == 0.5
    spec = _spec(objective="dpo", method="qlora", preference={"beta": 0.3})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert _spec().objective == "sft" and _spec().preference is None


@pytest.mark.parametrize("top, message", [
    ({"preference": {"beta": 0.1}}, "preference: these settings apply to objective dpo"),
    ({"objective": "dpo", "preference": {"beta": 0}}, "greater than 0"),
    ({"objective": "dpo", "preference": {"gamma": 1.0}}, "preference.gamma: applies to objective 'simpo'"),
    ({"objective": "dpo", "packing": True}, "packing: not used with objective 'dpo'"),
    ({"objective": "orpo", "data_format": "chat"}, "data_format: objective 'orpo' trains on 'preference' lines"),
    ({"data_format": "preference"}, "data_format: 'preference' data trains a preference objective"),
    ({"objective": "ppo"}, "objective"),
    ({"objective": "dpo", "method": "full", "strategy": "fsdp"}, "strategy: DPO keeps a whole frozen copy"),
])
def test_bad_preference_settings_name_the_field(top, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _spec(**top)


# --- the data -------------------------------------------------------------------------------------


def test_preference_lines_are_checked_line_by_line(tmp_path: Path):
    from trainer.data.validate import validate_file

    good = pairs(3, 0)
    bad = [dict(good[0]), {**good[1], "non_preferred_output": [{"role": "user", "content": "x"}]},
           {k: v for k, v in good[2].items() if k != "non_preferred_output"}, {**good[0], "input": {"messages": []}}]
    bad[0]["preferred_output"] = []
    report = validate_file(write_jsonl(tmp_path / "p.jsonl", [good[0], *bad]))
    assert report["format"] == "preference" and not report["valid"]
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (2, "invalid_type"), (3, "invalid_role"), (4, "missing_field"), (5, "missing_messages")]
    assert "'non_preferred_output' is missing" in report["errors"][2]["message"]
    assert validate_file(write_jsonl(tmp_path / "ok.jsonl", good))["valid"]


def test_a_pair_becomes_two_rows_with_only_the_outputs_labelled(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from trainer.data.batch import PAIRS, collate
    from trainer.data.dataset import load_tokenized
    from trainer.data.tokenize import IGNORE_INDEX

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_tokenized(write_jsonl(tmp_path / "p.jsonl", pairs(2, 0)), tok, 64, data_format="preference")
    batch = collate(data.examples, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and int(batch[PAIRS]) == 2
    for row, want in ((0, "preferred_output"), (2, "non_preferred_output")):
        labels = batch["labels"][row]
        text = tok.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
        assert text == pairs(2, 0)[0][want][0]["content"]


# --- the chunked log-probabilities ----------------------------------------------------------------


def test_chunked_token_logprobs_match_log_softmax_with_their_gradients():
    from trainer.linear_ce import linear_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)  # each row's gradient differs, as in DPO
    got = linear_token_logprobs(h, w, t, chunk=8)
    (got * weights).sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = torch.log_softmax(h @ w.t(), -1).gather(1, t[:, None]).squeeze(1)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, (h.grad, w.grad))


def test_chunked_sequence_logps_equal_the_full_logits_ones(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.batch import collate
    from trainer.data.dataset import load_tokenized
    from trainer.loss_heads import _plain_head
    from trainer.preference import sequence_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    data = load_tokenized(write_jsonl(tmp_path / "p.jsonl", pairs(3, 1)), tok, 64, data_format="preference")
    batch = collate(data.examples, tok.pad_token_id)
    plain, counts = sequence_logps(model, batch, "cpu", None)
    chunked, _ = sequence_logps(model, batch, "cpu", _plain_head(model), chunk=4)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [int((r[1:] != -100).sum()) for r in batch["labels"]]


# --- learning a preference ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("preference")
    return {"train": str(write_jsonl(root / "train.jsonl", pairs(96, 1))),
            "valid": str(write_jsonl(root / "valid.jsonl", pairs(24, 2)))}


def _own_preference(model, examples: list[dict], pad_id: int) -> float:
    """The share of pairs whose preferred output the model itself finds likelier (no reference)."""
    from trainer.data.batch import collate
    from trainer.preference import sequence_logps

    batch = collate(examples, pad_id)
    with torch.no_grad():
        logps, _ = sequence_logps(model, batch, "cpu", None)
    n = len(examples)
    return float((logps[:n] > logps[n:]).float().mean())


@pytest.mark.slow
def test_dpo_learns_to_prefer_the_reversed_word(preference_files, tiny_model_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.dataset import load_tokenized
    from trainer.events import read_events
    from trainer.job import run_job

    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "objective": "dpo", "lora": {"r": 8, "alpha": 16},
        "training_file": preference_files["train"], "validation_file": preference_files["valid"],
        "hyperparameters": {"max_steps": 24, "batch_size": 8, "learning_rate": 3e-3, "max_seq_len": 64,
                            "warmup_steps": 2, "seed": 3},
        "schedule": {"eval_every_steps": 12, "log_every_steps": 4},
    })
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    events = list(read_events(out / "events.jsonl"))
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    valid = [e["data"] for e in events if e["type"] == "validation"]
    print([(m["step"], round(m["train_loss"], 3), round(m["train_reward_margin"], 3)) for m in metrics],
          [round(v["valid_preference_accuracy"], 3) for v in valid])
    for m in metrics:
        assert m["train_reward_margin"] == pytest.approx(m["train_chosen_reward"] - m["train_rejected_reward"])
        assert 0 <= m["train_preference_accuracy"] <= 1
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert valid[-1]["full_valid_preference_accuracy"] > 0.9
    assert valid[-1]["valid_loss"] < 0.6931  # below -log sigmoid(0), where the pairs start
    # The trained model itself, not only its reward against the base, finds the reversed word the
    # likelier answer, which the base model does not.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    held_out = load_tokenized(preference_files["valid"], tok, 64, data_format="preference").examples
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = _own_preference(base, held_out, tok.pad_token_id)
    tuned = PeftModel.from_pretrained(base, out / "final").eval()
    after = _own_preference(tuned, held_out, tok.pad_token_id)
    print(f"the model prefers the reversed word in {before:.2f} of held-out pairs before, {after:.2f} after")
    assert before < 0.5 and after > 0.9


# A preference the tiny model can act on: after a short SFT warm-up it answers "The moon." to three
# quarters of its prompts and "The sun." to the rest, so greedy decoding says the moon; DPO, continued
# from that adapter, prefers the sun. Held-out prompts name things no training prompt names.
SUN, MOON = "The sun.", "The moon."
SEEN, UNSEEN = WORDS[:14], WORDS[14:] + ["harbor", "meadow", "tower", "valley"]


def _shines(word: str) -> list[dict]:
    return [{"role": "user", "content": f"What shines on the {word}?"}]


def _warm_up_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": _shines(rng.choice(SEEN)) + [{"role": "assistant", "content": MOON if i % 4 else SUN}]}
            for i in range(n)]


def _sun_over_moon(words: list[str]) -> list[dict]:
    return [{"input": {"messages": _shines(w)}, "preferred_output": [{"role": "assistant", "content": SUN}],
             "non_preferred_output": [{"role": "assistant", "content": MOON}]} for w in words]


def _greedy_answers(model, tok, words: list[str]) -> list[str]:
    """Each prompt's greedy answer, the prompt rendered as serving renders it (chat_prompt_ids)."""
    from trainer.data.tokenize import chat_prompt_ids

    answers = []
    for w in words:
        ids = chat_prompt_ids(tok, _shines(w))
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        answers.append(tok.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return answers


@pytest.mark.slow
def test_dpo_continued_from_sft_changes_what_greedy_decoding_answers(tiny_model_dir: Path, tmp_path: Path):
    """The trained model says the preferred answer on held-out prompts where the model it started
    from said the other one. Its reference is the warmed-up adapter it continues from, so the
    rewards start at zero."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.events import read_events
    from trainer.job import run_job

    def spec(**top) -> JobSpec:
        return JobSpec.model_validate({"model": str(tiny_model_dir), "method": "lora", "lora": {"r": 8, "alpha": 16},
                                       **top})

    rng = random.Random(4)
    warm_up, dpo = tmp_path / "sft", tmp_path / "dpo"
    assert run_job(spec(training_file=str(write_jsonl(tmp_path / "sft.jsonl", _warm_up_rows(64, 1))),
                        hyperparameters={"max_steps": 24, "batch_size": 8, "learning_rate": 8e-3, "max_seq_len": 32,
                                         "warmup_steps": 2, "seed": 3}), warm_up) == 0
    assert run_job(spec(objective="dpo", init_from=str(warm_up / "final"),
                        training_file=str(write_jsonl(tmp_path / "train.jsonl",
                                                      _sun_over_moon([rng.choice(SEEN) for _ in range(64)]))),
                        validation_file=str(write_jsonl(tmp_path / "valid.jsonl", _sun_over_moon(UNSEEN))),
                        hyperparameters={"max_steps": 8, "batch_size": 8, "learning_rate": 3e-3, "max_seq_len": 32,
                                         "warmup_steps": 1, "seed": 3}), dpo) == 0
    events = list(read_events(dpo / "events.jsonl"))
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert metrics[0]["train_reward_margin"] == pytest.approx(0, abs=1e-4)  # compared with the warmed-up model
    assert [e["data"] for e in events if e["type"] == "validation"][-1]["full_valid_preference_accuracy"] > 0.9

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = {}
    for name, out in (("warmed up", warm_up), ("dpo", dpo)):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        answers[name] = _greedy_answers(PeftModel.from_pretrained(base, out / "final").eval(), tok, UNSEEN)
    print(answers)
    assert SUN not in answers["warmed up"] and answers["warmed up"].count(MOON) >= 0.9 * len(UNSEEN)
    assert answers["dpo"].count(SUN) >= 0.9 * len(UNSEEN)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_objectives_learn_the_preference(objective, preference_files, tiny_model_dir: Path,
                                                        tmp_path: Path):
    from trainer.events import read_events
    from trainer.job import run_job

    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "objective": objective,
        "training_file": preference_files["train"], "validation_file": preference_files["valid"],
        "hyperparameters": {"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3, "max_seq_len": 64,
                            "warmup_steps": 2, "seed": 3},
        "schedule": {"log_every_steps": 4},
    })
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    valid = [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == "validation"]
    assert valid[-1]["full_valid_preference_accuracy"] > 0.9


def test_full_dpo_keeps_a_frozen_reference_and_the_planner_counts_it():
    from trainer.planning.request import estimate_for_spec
    from trainer.tiny import build_config

    config = build_config("llama-3.2-1b")
    body = {"model": "x", "training_file": "t", "hyperparameters": {"batch_size": 2, "max_seq_len": 512}}
    sft = estimate_for_spec({**body, "method": "full"}, config, speed="fast")
    dpo = estimate_for_spec({**body, "method": "full", "objective": "dpo"}, config, speed="fast")
    simpo = estimate_for_spec({**body, "method": "full", "objective": "simpo"}, config, speed="fast")
    lora_dpo = estimate_for_spec({**body, "method": "lora", "objective": "dpo"}, config, speed="fast")
    assert dpo.parts["reference_weights"] == dpo.parts.get("reference_weights") > 2e9  # 1.2B bf16 weights
    assert "reference_weights" not in simpo.parts and "reference_weights" not in lora_dpo.parts
    assert dpo.total > simpo.total > sft.total  # two rows a pair, and the reference on top
    assert simpo.batch_size == 2 * sft.batch_size


def test_the_reference_is_the_adapter_switched_off_or_a_frozen_copy(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    from trainer.loss_heads import PlainLoss
    from trainer.methods import apply_method
    from trainer.preference import reference_for

    lora_spec = _spec(model=str(tiny_model_dir), objective="dpo")
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), lora_spec)
    ref = reference_for(lora_spec, model, PlainLoss(), None)
    assert ref.adapter_off and ref.model is model  # no second model
    full_spec = _spec(model=str(tiny_model_dir), objective="dpo", method="full")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = reference_for(full_spec, model, PlainLoss(), torch.bfloat16)
    assert not ref.adapter_off and ref.model is not model
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in ref.model.parameters())
    assert reference_for(_spec(objective="simpo"), model, PlainLoss(), None) is None
    assert json.dumps(_spec(objective="dpo").model_dump(mode="json")["preference"]) == '{"beta": "auto", "gamma": null}'


def test_the_token_cache_keeps_both_rows_of_a_pair(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from transformers import AutoTokenizer

    from trainer.data.dataset import load_tokenized
    from trainer.data.tokenize import REJECTED_IDS

    monkeypatch.setenv("TUNEQ_TOKEN_CACHE_DIR", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_jsonl(tmp_path / "p.jsonl", pairs(4, 3))
    fresh = load_tokenized(path, tok, 64, data_format="preference").examples
    assert list((tmp_path / "cache").iterdir())
    cached = load_tokenized(path, tok, 64, data_format="preference").examples
    assert cached == fresh and REJECTED_IDS in cached[0]


@pytest.mark.slow
def test_a_resumed_full_dpo_run_keeps_the_starting_model_as_its_reference(preference_files, tiny_model_dir: Path,
                                                                          tmp_path: Path):
    """The frozen copy is made before the checkpoint's weights are loaded: a run resumed at step 3
    compares with the model as the job started, so its steps equal those of the straight run."""
    import shutil

    from trainer.events import read_events
    from trainer.job import run_job

    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "full", "objective": "dpo", "training_file": preference_files["train"],
        "hyperparameters": {"max_steps": 5, "batch_size": 4, "learning_rate": 1e-4, "max_seq_len": 64,
                            "warmup_steps": 1},
        "schedule": {"checkpoint_every_steps": 3, "keep_checkpoints": 5},
    })
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_job(spec, straight) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    assert run_job(spec, resumed, resume=True) == 0

    def margins(out: Path) -> dict[int, float]:
        return {e["data"]["step"]: e["data"]["train_reward_margin"] for e in read_events(out / "events.jsonl")
                if e["type"] == "metrics"}

    a, b = margins(straight), margins(resumed)
    assert sorted(b) == [4, 5] and a[5] != 0
    for step in (4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), (step, a, b)

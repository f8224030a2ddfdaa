"""The eval block: its graders, its file format, its checks in the spec, and a run that scores
every checkpoint on the reverse-words task and exports the best one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.datasets import WORDS, reverse_dataset
from tests.unit.conftest import write_jsonl
from trainer.data.validate import validate_file
from trainer.eval_settings import Grader
from trainer.graders import best_step, grade, levenshtein, score, similarity
from trainer.spec import JobSpec

SYSTEM = {"role": "system", "content": "You reverse words."}
EIGHT = WORDS[:8]


def eval_rows(words: list[str]) -> list[dict]:
    return [{"messages": [SYSTEM, {"role": "user", "content": f"Reverse: {w}"}], "expected": w[::-1]} for w in words]


# --- graders ----------------------------------------------------------------------------------


def test_each_grader_scores_an_answer():
    exact, contains = Grader(type="exact_match"), Grader(type="contains")
    assert score(exact, "  elppa\n", "elppa") == 1.0 and score(exact, "Elppa", "elppa") == 0.0
    assert score(Grader(type="exact_match", ignore_case=True), "Elppa", "elppa") == 1.0
    assert score(contains, "it is elppa.", "elppa") == 1.0 and score(contains, "elpp", "elppa") == 0.0
    regex = Grader(type="regex", pattern=r"^[a-z]+$")
    assert score(regex, "revir", "ignored") == 1.0 and score(regex, "two words", "x") == 0.0
    assert levenshtein("kitten", "sitting") == 3
    assert similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert score(Grader(type="similarity"), "abc", "abc") == 1.0 and similarity("", "") == 1.0
    got = grade([exact, Grader(type="similarity", name="sim")], ["elppa", "x"], ["elppa", "revir"])
    assert got == {"eval_exact_match": 0.5, "eval_sim": pytest.approx((1.0 + 0.0) / 2)}


def test_best_step_is_the_earliest_of_the_highest():
    evaluated = [(30, {"eval_em": 0.5}), (10, {"eval_em": 0.75}), (20, {"eval_em": 0.75}), (40, {})]
    assert best_step(evaluated, "eval_em") == (10, 0.75)
    assert best_step([(5, {"other": 1.0})], "eval_em") is None


# --- the spec -----------------------------------------------------------------------------------


def _spec(**top) -> dict:
    return {"model": "m", "training_file": "t.jsonl", **top}


@pytest.mark.parametrize(("block", "export", "field"), [
    ({"file": "e", "graders": [{"type": "bleu"}]}, None, "eval.graders.0.type"),
    ({"file": "e", "graders": [{"type": "regex", "pattern": "(unclosed"}]}, None, "eval.graders[0].pattern"),
    ({"file": "e", "graders": [{"type": "regex"}]}, None, "eval.graders[0].pattern"),
    ({"file": "e", "graders": [{"type": "contains", "pattern": "x"}]}, None, "eval.graders[0].pattern"),
    ({"file": "e", "graders": [{"type": "contains"}, {"type": "contains"}]}, None, "eval.graders[1].name"),
    ({"file": "e", "max_new_tokens": 5000}, None, "eval.max_new_tokens"),
    ({"file": "e", "graders": []}, None, "eval.graders"),
    (None, {"select": "best"}, "export.select"),
    ({"file": "e"}, {"select": "best", "metric": "similarity"}, "export.metric"),
    ({"file": "e"}, {"metric": "exact_match"}, "export.metric"),
])
def test_bad_eval_blocks_name_their_field(block, export, field):
    top = {k: v for k, v in (("eval", block), ("export", export)) if v is not None}
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(_spec(**top))
    e = err.value.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    assert field in where or e["msg"].split("Value error, ")[-1].startswith(field), (where, e["msg"])


def test_a_good_eval_block_and_its_defaults():
    spec = JobSpec.model_validate(_spec(eval={"file": "e.jsonl"}, export={"select": "best"}))
    assert [g.score_name for g in spec.eval.graders] == ["exact_match"]
    assert spec.eval.max_new_tokens == 64 and spec.eval.temperature == 0.0
    from trainer.eval_settings import selection_metric

    assert selection_metric(spec) == "eval_exact_match"
    assert selection_metric(JobSpec.model_validate(_spec(eval={"file": "e"}))) is None
    with pytest.raises(ValidationError, match="strategy 'fsdp' shards"):
        JobSpec.model_validate(_spec(method="full", strategy="fsdp", eval={"file": "e"}))


# --- the file format --------------------------------------------------------------------------


def test_an_eval_file_is_detected_and_its_bad_lines_are_numbered(tmp_path: Path):
    good = write_jsonl(tmp_path / "good.jsonl", eval_rows(EIGHT))
    report = validate_file(good)
    assert report["valid"] and report["format"] == "eval" and report["examples"] == 8
    rows = eval_rows(EIGHT[:2]) + [
        {"messages": [SYSTEM, {"role": "user", "content": "Reverse: x"}, {"role": "assistant", "content": "x"}],
         "expected": "x"},
        {"messages": [{"role": "user", "content": "Reverse: y"}], "expected": 3},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    report = validate_file(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert not report["valid"]
    by_line = {e["line"]: e for e in report["errors"]}
    assert sorted(by_line) == [3, 4, 5]
    assert "ends with the user turn" in by_line[3]["message"]
    assert "'expected' must be a string" in by_line[4]["message"]
    assert by_line[5]["code"] == "wrong_format"


def test_an_eval_file_is_not_training_data(tiny_model_dir: Path, tmp_path: Path):
    from trainer.data.dataset import load_tokenized
    from trainer.errors import DataError
    from trainer.model import load_tokenizer

    path = write_jsonl(tmp_path / "e.jsonl", eval_rows(EIGHT))
    tok = load_tokenizer(str(tiny_model_dir))
    report = validate_file(path, tok, 64)
    assert report["valid"] and report["tokens"] > 8 * 5 and report["trained_tokens"] == 0
    with pytest.raises(DataError, match="this is an eval file"):
        load_tokenized(path, tok, 64)


# --- runs ---------------------------------------------------------------------------------------


def _events(out: Path, kind: str) -> list[dict]:
    from trainer.events import read_events

    return [e for e in read_events(out / "events.jsonl") if e["type"] == kind]


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a hundred steps and ten eval passes: about 6 s on a quiet CPU
def test_exact_match_rises_across_checkpoints_and_the_best_is_exported(tiny_model_dir: Path, tmp_path: Path):
    """Reverse-words on the tiny model: the eval pass at each checkpoint answers eight held-out
    prompts; exact match climbs from near 0 to >= 0.8, and final/ holds the best step's adapter."""
    from trainer.job import run_job

    train = tmp_path / "train.jsonl"
    train.write_text(reverse_dataset(64, seed=1, words=EIGHT))
    evals = write_jsonl(tmp_path / "eval.jsonl", eval_rows(EIGHT))
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(train), "lora": {"r": 16, "alpha": 64},
        "hyperparameters": {"max_steps": 100, "batch_size": 8, "learning_rate": 1e-2, "max_seq_len": 64,
                            "warmup_steps": 2},
        "schedule": {"checkpoint_every_steps": 10, "keep_checkpoints": 1},
        "eval": {"file": str(evals), "max_new_tokens": 8, "batch_size": 8,
                 "graders": [{"type": "exact_match"}, {"type": "similarity"}]},
        "export": {"select": "best", "metric": "exact_match"},
    })
    out = tmp_path / "out"
    assert run_job(spec, out) == 0
    passes = _events(out, "eval")
    scores = [(e["data"]["step"], e["data"]["eval_exact_match"]) for e in passes]
    print("exact match by step:", scores, "seconds:", [e["data"]["eval_seconds"] for e in passes])
    assert [s for s, _ in scores] == list(range(10, 101, 10))
    assert scores[0][1] <= 0.25 and max(v for _, v in scores) >= 0.8
    assert all(e["data"]["eval_seconds"] > 0 and len(e["data"]["samples"]) == 3 for e in passes)
    # Each checkpoint event carries the scores of its own weights.
    for ck in _events(out, "checkpoint"):
        assert ck["data"]["metrics"]["eval_exact_match"] == dict(scores)[ck["data"]["step"]]
    best = best_step([(s, {"m": v}) for s, v in scores], "m")[0]
    finished = _events(out, "finished")[-1]["data"]
    assert finished["exported_step"] == best and finished["metrics"]["export_metric"] == "eval_exact_match"
    # Kept from rotation (keep_checkpoints 1) because it is the best, and final/ holds its weights.
    kept = out / "checkpoints" / f"step-{best:08d}"
    assert kept.is_dir()
    assert _same(_weights(out / "final"), _weights(kept))
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["metrics"]["exported_step"] == best
    assert manifest["metrics"]["eval_exact_match"] == dict(scores)[best]
    assert manifest["spec"]["eval"]["file"] == "eval.jsonl"  # a name, not where the server keeps it


def test_the_best_checkpoint_not_the_last_is_exported(make_spec, tmp_path: Path, monkeypatch):
    """Scores that peak in the middle (the eval pass is replaced by a fixed sequence): final/ holds
    step 4's adapter, not the last step's; without select best it holds the last."""
    import trainer.loop

    evals = write_jsonl(tmp_path / "eval.jsonl", eval_rows(EIGHT[:2]))
    sequence = iter([0.25, 0.75, 0.5])

    def fixed(*_args, **_kw):
        return {"eval_exact_match": next(sequence), "eval_seconds": 0.01, "eval_examples": 2, "samples": []}

    monkeypatch.setattr(trainer.loop, "eval_pass", fixed)
    spec = make_spec("lora", {"max_steps": 6}, {"checkpoint_every_steps": 2, "keep_checkpoints": 1},
                     eval={"file": str(evals)}, export={"select": "best"})
    from trainer.job import run_job

    out = tmp_path / "best"
    assert run_job(spec, out) == 0
    assert [e["data"]["step"] for e in _events(out, "eval")] == [2, 4, 6]
    assert _events(out, "finished")[-1]["data"]["exported_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    final = _weights(out / "final")
    assert _same(final, _weights(out / "checkpoints" / "step-00000004"))
    assert not _same(final, _weights(out / "checkpoints" / "step-00000006"))


def test_the_planner_counts_eval_generation():
    from trainer.planning.plan import plan
    from trainer.tiny import build_config

    config = build_config("llama-3.2-1b")
    base = {"model": "m", "training_file": "t", "method": "lora",
            "hyperparameters": {"max_steps": 100, "batch_size": 4, "max_seq_len": 512},
            "schedule": {"checkpoint_every_steps": 30}}
    without = plan(base, config, 80 * 2**30, dataset_tokens=10**6).compute
    with_eval = plan({**base, "eval": {"file": "e", "max_examples": 64, "max_new_tokens": 32}}, config, 80 * 2**30,
                     dataset_tokens=10**6).compute
    assert without.eval_passes == 0 and with_eval.eval_passes == 4  # steps 30, 60, 90 and the end
    assert with_eval.seconds == pytest.approx(without.seconds + with_eval.eval_seconds) and with_eval.eval_seconds > 0


def test_a_resumed_run_remembers_the_best_step(make_spec, tmp_path: Path, monkeypatch):
    """The best pass so far is part of the checkpoint's state: a run resumed after it still exports it."""
    import trainer.loop
    from trainer.job import run_job

    evals = write_jsonl(tmp_path / "eval.jsonl", eval_rows(EIGHT[:2]))
    sequence = iter([0.75, 0.25, 0.5, 0.5])

    def fixed(*_args, **_kw):
        return {"eval_exact_match": next(sequence), "eval_seconds": 0.01, "eval_examples": 2, "samples": []}

    monkeypatch.setattr(trainer.loop, "eval_pass", fixed)
    out = tmp_path / "run"
    first = make_spec("lora", {"max_steps": 4}, {"checkpoint_every_steps": 2, "keep_checkpoints": 1},
                      eval={"file": str(evals)}, export={"select": "best"})
    assert run_job(first, out) == 0  # passes at 2 (best) and 4
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["train_state"]["best"]["step"] == 2
    longer = first.model_copy(update={"hyperparameters": first.hyperparameters.model_copy(update={"max_steps": 6})})
    assert run_job(longer, out, resume=True) == 0  # resumed at step 4: one more pass, at 6 (0.5)
    assert [e["data"]["step"] for e in _events(out, "eval")][-1] == 6
    assert _events(out, "finished")[-1]["data"]["exported_step"] == 2
    assert _same(_weights(out / "final"), _weights(out / "checkpoints" / "step-00000002"))

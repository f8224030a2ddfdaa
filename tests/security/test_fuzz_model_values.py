"""Fuzz job bodies whose validity depends on the model: a real tiny model, real files, no 5xx.

The schema fuzzer (tests/integration/test_api_fuzz.py) cannot reach values like
`checkpoint_layers` 3 on a 2-layer model: its bodies name no model or file that exists. Here every
body names the tiny model and files uploaded first (one deleted, one failing validation), and
draws the fields whose meaning depends on the model, so the planner and the spec's checks meet
them together, on the plan route and on job creation.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.security.conftest import GOOD_LINE, upload

pytestmark = pytest.mark.slow

CASES = 1000

small_ints = st.integers(min_value=-2, max_value=6)
methods = st.one_of(
    st.sampled_from(["lora", "qlora", "full", "ia3", "prefix", "freeze", "auto", "dpo"]),
    st.fixed_dictionaries({"type": st.just("freeze"), "freeze": st.fixed_dictionaries({"trainable_layers": small_ints})}),
    st.fixed_dictionaries({"type": st.sampled_from(["lora", "qlora"]), "lora": st.fixed_dictionaries(
        {"r": st.integers(0, 64)},
        optional={"target_modules": st.one_of(st.just("all-linear"), st.lists(
            st.sampled_from(["q_proj", "v_proj", "down_proj", "lm_head", "nope", ""]), max_size=3)),
            "use_dora": st.booleans(), "alpha": st.floats(-1, 64)})}),
    st.fixed_dictionaries({"type": st.just("prefix"), "prefix": st.fixed_dictionaries({"num_virtual_tokens": st.integers(0, 5000)})}),
)
hyper = st.fixed_dictionaries({}, optional={
    "batch_size": st.one_of(st.just("auto"), st.integers(0, 64)),
    "max_seq_len": st.integers(0, 70_000),
    "gradient_accumulation_steps": st.integers(0, 9),
    "max_steps": st.integers(0, 2_000_000),
    "n_epochs": st.one_of(st.just("auto"), st.integers(0, 3), st.booleans()),
    "max_grad_norm": st.floats(-1, 2),
    "warmup_steps": st.integers(0, 10),
    "learning_rate_multiplier": st.one_of(st.just("auto"), st.floats(0, 10)),
})


def bodies(files: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    file_ids = st.sampled_from(list(files.values()))
    return st.fixed_dictionaries({"model": st.sampled_from(["tiny-llama", "tiny-llama", "tiny-llama", "./tiny-llama"]),
                                  "training_file": file_ids}, optional={
        "method": methods,
        "hyperparameters": hyper,
        "speed": st.sampled_from(["lean", "balanced", "fast", "auto"]),
        "checkpoint_layers": small_ints,
        "checkpoint_offload": st.booleans(),
        "optimizer_in_backward": st.booleans(),
        "optimizer": st.sampled_from(["adamw", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"]),
        "strategy": st.sampled_from(["auto", "ddp", "fsdp"]),
        "full_precision": st.sampled_from(["fp32_master", "bf16"]),
        "precision": st.sampled_from(["auto", "bf16", "fp32", "fp16"]),
        "gradient_checkpointing": st.booleans(),
        "gpus": st.integers(0, 9),
        "priority": st.integers(-3, 3),
        "data_format": st.sampled_from(["auto", "chat", "text", "alpaca", "prompt_completion"]),
        "packing": st.booleans(),
        "train_on_inputs": st.booleans(),
        "validation_file": file_ids,
        "forgetting_file": file_ids,
        "mix": st.lists(st.fixed_dictionaries({"file": file_ids, "weight": st.floats(-1, 3)}), max_size=2),
        "schedule": st.fixed_dictionaries({}, optional={"checkpoint_every_steps": st.integers(0, 3),
                                                        "keep_checkpoints": st.integers(0, 200),
                                                        "eval_every_steps": st.integers(0, 3)}),
        "export": st.fixed_dictionaries({"merged": st.booleans()}),
        "suffix": st.sampled_from(["ok", "bad suffix", "x" * 65]),
    })


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # it refuses more than SQLite does
def test_model_dependent_values_never_cause_a_server_error(member, limits) -> None:  # noqa: ANN001
    limits(job_create_rate=100_000, max_active_jobs_per_user=100_000, max_gpus_per_user=100_000,
           max_gpu_hours_per_user=1e9, min_checkpoint_every_minutes=0)
    files = {"good": upload(member, 8), "text": upload(member, text=json.dumps({"text": "plain words " * 40}) + "\n"),
             "gone": upload(member)}
    member.delete(f"/v1/files/{files['gone']}")
    r = member.post("/v1/files", files={"file": ("bad.jsonl", "not json\n" + GOOD_LINE + "\n")}, data={"purpose": "fine-tune"})
    files["invalid"] = r.json()["id"]
    statuses: dict[int, int] = {}
    failures: list[str] = []

    @given(body=bodies(files), create=st.integers(0, 3))
    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(body: dict[str, Any], create: int) -> None:
        # One body in four creates a job (stored, queued); the rest only plan.
        route = "/v1/fine_tuning/jobs" if create == 0 else "/v1/fine_tuning/plan"
        r = member.post(route, json=body)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 500 and len(failures) < 10:
            failures.append(f"{route} {r.status_code} {r.text[:300]}\n  {json.dumps(body)[:600]}")

    run()
    print(f"model-dependent fuzz: {sum(statuses.values())} cases, statuses {sorted(statuses.items())}")
    assert failures == []
    assert sum(statuses.values()) >= CASES
    assert statuses.get(200, 0) >= 50 and statuses.get(400, 0) >= 50  # both sides of validity were reached

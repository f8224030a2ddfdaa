"""Plan a job without creating it: memory per method, the recommendation and the time estimate.

The body is a job creation body; nothing is stored or enqueued, and no weights are read (the
model's config.json is enough).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import data_check, planning
from api.continuation import resolve_source
from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import APIError
from api.job_spec import build_spec
from api.routes.jobs import _usable_file
from api.schemas import CreateJobRequest
from core.model_roots import resolve_model

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/plan")
def plan_fine_tuning_job(body: CreateJobRequest, user: CurrentUser, db: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    model_path = resolve_model(body.model, settings)
    training = _usable_file(db, body.training_file, "training_file", user)
    source = resolve_source(db, user, body.from_checkpoint, body.model) if body.from_checkpoint else None
    examples = (training.report or {}).get("examples")
    seen: list[dict[str, Any]] = []
    spec = build_spec(
        body, model_path=model_path, init_from=source.ref if source else None,
        inherited=source.method_fields() if source else None,
        choose=planning.chooser(model_path, body.gpus, settings, examples if isinstance(examples, int) else None,
                                refuse=False, seen=seen),
    )
    planned = spec.model_dump(mode="json")
    if seen:
        # Plan what was asked ("auto" included), not what the chooser already resolved it to.
        planned["method"] = seen[0]["method"]
        planned["hyperparameters"] = {**planned["hyperparameters"], **seen[0]["hyperparameters"]}
    tokens = planning.tokens_of(training.report)
    if tokens is None:
        try:
            stats = data_check.check_file(training, "training_file", model_path, spec.hyperparameters.max_seq_len,
                                          spec.data_format, spec.train_on_inputs)
        except APIError:
            stats = None  # the job would be refused for its data; the memory plan still stands
        tokens = planning.tokens_of(stats)
    p = planning.make_plan(planned, model_path, body.gpus, settings, dataset_tokens=tokens)
    if p is None:
        raise APIError(400, f"model: {body.model!r} has no local config.json to plan from (hub models are not fetched "
                       "by the API)", param="model", code="model_unplannable")
    p = planning.to_json(p)
    compute = p.get("compute")
    return {
        "object": "fine_tuning.plan",
        "model": body.model,
        "recommendation": {"method": p["method"], "batch_size": p["batch_size"], "fits": p["fits"],
                           "speed": p["speed"], "strategy": p["strategy"],
                           "message": p["message"], "suggestions": p["suggestions"]},
        "time": {
            "dataset_tokens": tokens,
            "flops": compute["total_flops"] if compute else None,
            "seconds": compute["seconds"] if compute else None,
            "gpu_hours": compute["gpu_hours"] if compute else None,
        },
        "plan": p,
    }

"""Plan a job without creating it: memory per method, the recommendation and the time estimate.

The body is a job creation body; nothing is stored or enqueued, and no weights are read (the
model's config.json is enough).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import admission
from api.deps import CurrentUser, SessionDep, SettingsDep
from api.schemas import CreateJobRequest

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/plan")
def plan_fine_tuning_job(body: CreateJobRequest, user: CurrentUser, db: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    p, tokens = admission.plan_only(db, user, body, settings)
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
            "startup_seconds": compute["startup_seconds"] if compute else None,
            "startup_source": compute["startup_source"] if compute else None,
            "checkpoints": compute["checkpoints"] if compute else None,
            "checkpoint_seconds": compute["checkpoint_seconds"] if compute else None,
            "wall_seconds": compute["wall_seconds"] if compute else None,
            "efficiency": compute["efficiency"] if compute else None,
            "efficiency_source": compute["efficiency_source"] if compute else None,
            "gpu_hours": compute["gpu_hours"] if compute else None,
        },
        "plan": p,
    }

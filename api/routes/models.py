"""Models: the base models jobs may start from (the directories under TUNEQ_MODEL_ROOTS), and the
fine-tuned models of the jobs the caller may read, as OpenAI lists an organization's own."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import not_found
from api.pagination import MAX_LIMIT
from api.schemas import ModelOut, Page, owner_of
from core import states
from core.identity import readable_jobs
from core.inference import find_fine_tuned, is_fine_tuned_name
from core.model_roots import list_models
from core.models import Job

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models_route(user: CurrentUser, db: SessionDep, settings: SettingsDep) -> Page[ModelOut]:
    """The base models, then the fine-tuned models of succeeded jobs the caller may read, newest
    first. Not paged, as OpenAI's list is not: has_more is true only when more than MAX_LIMIT
    fine-tuned models are readable, of which the newest are listed."""
    items = [ModelOut(id=m.name, created=int(m.created_at)) for m in list_models(settings)]
    rows = db.execute(
        select(Job.fine_tuned_model, Job.finished_at, Job.created_at, Job.owner_id)
        .where(readable_jobs(user), Job.status == states.SUCCEEDED, Job.fine_tuned_model.is_not(None))
        .order_by(Job.finished_at.desc(), Job.id.desc()).limit(MAX_LIMIT + 1)
    ).all()
    items += [ModelOut(id=name, created=int(finished or created), owned_by=owner_of(owner))
              for name, finished, created, owner in rows[:MAX_LIMIT]]
    return Page[ModelOut](data=items, has_more=len(rows) > MAX_LIMIT)


# Names may be "org/name", as on a model hub, or a fine-tuned model's "ft:base:suffix:job".
@router.get("/{model:path}")
def get_model(model: str, user: CurrentUser, db: SessionDep, settings: SettingsDep) -> ModelOut:
    if is_fine_tuned_name(model):
        found = find_fine_tuned(db, user, model)
        if found is None:
            raise not_found("model", model, "model")
        return ModelOut(id=model, created=int(found.created), owned_by=owner_of(found.job.owner_id))
    for m in list_models(settings):
        if m.name == model:
            return ModelOut(id=m.name, created=int(m.created_at))
    raise not_found("model", model, "model")

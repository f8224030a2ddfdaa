"""Base models that jobs may start from: the directories under TUNEQ_MODEL_ROOTS."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser, SettingsDep
from api.errors import not_found
from api.schemas import ModelOut, Page
from core.model_roots import list_models

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_base_models(user: CurrentUser, settings: SettingsDep) -> Page[ModelOut]:
    items = [ModelOut(id=m.name, created=int(m.created_at)) for m in list_models(settings)]
    return Page[ModelOut](data=items, has_more=False)


# Names may be "org/name", as on a model hub.
@router.get("/{model:path}")
def get_base_model(model: str, user: CurrentUser, settings: SettingsDep) -> ModelOut:
    for m in list_models(settings):
        if m.name == model:
            return ModelOut(id=m.name, created=int(m.created_at))
    raise not_found("model", model)

"""A job's events in OpenAI's shape: a typed client (the SDK's own models) accepts every one."""
import pytest
from openai.types.fine_tuning import FineTuningJobEvent

from api.routes.events import event_out
from core.models import JobEvent


@pytest.mark.parametrize(("level", "kind", "want_level", "want_type"), [
    ("info", "metrics", "info", "metrics"),
    ("info", "status", "info", "message"),
    ("warning", "retry", "warn", "message"),
    ("error", "error", "error", "message"),
    ("info", "checkpoint", "info", "message"),
])
def test_each_event_is_openais_with_tuneqs_kind_beside(level: str, kind: str, want_level: str, want_type: str) -> None:
    ev = JobEvent(id="ftevent-1", job_id="ftjob-1", seq=1, created_at=1.0, level=level, type=kind,
                  message="m", data={"step": 1})
    body = event_out(ev).model_dump(mode="json")
    typed = FineTuningJobEvent.model_validate(body)
    assert (typed.level, typed.type, body["kind"]) == (want_level, want_type, kind)

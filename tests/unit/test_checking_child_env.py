"""The API's checking child takes exactly the calling app's TUNEQ_* settings with each check
(api.validation._take_env): one child serves apps whose settings differ, so a setting the caller
no longer has must not linger in it."""

from __future__ import annotations

import os

import pytest

from api import validation
from core.settings import get_settings


def test_the_child_takes_exactly_the_callers_tuneq_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("TUNEQ_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TUNEQ_MAX_UPLOAD_BYTES", "100")  # the last caller's
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # not a setting: left alone
    get_settings.cache_clear()
    assert get_settings().max_upload_bytes == 100

    validation._take_env({"TUNEQ_JOB_CREATE_RATE": "7"})

    assert "TUNEQ_MAX_UPLOAD_BYTES" not in os.environ and os.environ["TUNEQ_JOB_CREATE_RATE"] == "7"
    assert "PATH" in os.environ
    assert get_settings().max_upload_bytes != 100  # the settings were read again
    monkeypatch.delenv("TUNEQ_JOB_CREATE_RATE")
    get_settings.cache_clear()

"""docs/settings.md is generated from core/settings.py; these tests keep the two in step."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from core import settings_doc
from core.settings import Settings


def test_settings_page_is_current() -> None:
    on_disk = settings_doc.DOC_PATH.read_text(encoding="utf-8")
    assert on_disk == settings_doc.render(), "docs/settings.md is stale: run `python -m core.settings_doc`"


def test_every_setting_has_a_row() -> None:
    text = settings_doc.render()
    for name in Settings.model_fields:
        assert f"| `TUNEQ_{name.upper()}` |" in text


def test_check_flags_a_stale_page(tmp_path: Path) -> None:
    page = tmp_path / "settings.md"
    assert settings_doc.main(["--path", str(page)]) == 0
    assert settings_doc.main(["--check", "--path", str(page)]) == 0
    page.write_text(page.read_text() + "\nedited by hand\n")
    assert settings_doc.main(["--check", "--path", str(page)]) == 1


def test_a_setting_without_description_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Undocumented(Settings):
        secret_knob: int = Field(3)

    monkeypatch.setattr(settings_doc, "Settings", Undocumented)
    with pytest.raises(ValueError, match="secret_knob"):
        settings_doc.render()

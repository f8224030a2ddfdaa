"""The rooms' import rules (.importlinter): trainer is pure, core sits below api and worker."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_layers_import_only_downwards(capsys) -> None:  # noqa: ANN001
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    # The report names each broken contract and the import chain that breaks it.
    assert code == 0, report
    assert "0 broken" in report and "5 kept" in report

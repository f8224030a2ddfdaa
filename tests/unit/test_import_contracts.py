"""The rooms' import rules (.importlinter): trainer is pure, core sits below api and worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def loggers_left_as_they_were() -> Iterator[None]:
    """import-linter's CLI configures logging with dictConfig, whose default disables every logger
    it does not name: later tests in this process (the API's one-line errors) would log nothing."""
    before = {name: (lg.disabled, lg.level, lg.propagate, list(lg.handlers))
              for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    try:
        yield
    finally:
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if not isinstance(lg, logging.Logger):
                continue
            if name in before:
                lg.disabled, level, lg.propagate, lg.handlers = before[name]
                lg.setLevel(level)
            else:
                lg.handlers = []
                lg.disabled = False


def test_the_layers_import_only_downwards(capsys) -> None:  # noqa: ANN001
    from importlinter.cli import lint_imports

    api_log = logging.getLogger("tuneq.api")  # as the API's modules make it, before the lint runs
    with loggers_left_as_they_were():
        code = lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    # The report names each broken contract and the import chain that breaks it.
    assert code == 0, report
    assert "0 broken" in report and "5 kept" in report
    assert not api_log.disabled

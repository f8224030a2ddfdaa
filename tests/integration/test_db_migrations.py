"""The schema comes from Alembic alone, and it is exactly the one core/models.py describes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from core.migrate import REPO_ROOT, upgrade_head
from core.models import Base

# Migrations must build the same schema on both databases.
pytestmark = pytest.mark.dialects


def test_upgrade_builds_every_table(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_migrated_schema_matches_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    upgrade_head(database_url)  # the fixture already ran it once; a second run must be a no-op


def test_cli_migrates_from_any_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'cli.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, "-m", "core.migrate", "--url", url], cwd=tmp_path, env=env, check=True, capture_output=True
    )
    engine = create_engine(url)
    try:
        assert "jobs" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_alembic_cli_takes_url_from_x_argument(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "-x", f"url={url}", "upgrade", "head"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    engine = create_engine(url)
    try:
        assert "job_events" in inspect(engine).get_table_names()
    finally:
        engine.dispose()

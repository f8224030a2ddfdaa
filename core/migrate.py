"""Programmatic `alembic upgrade head`: the only way tuneq creates or changes its schema.

`python -m core.migrate` also creates a missing S3 bucket: it is the one step a deployment
runs before the API serves.

alembic.ini and migrations/ are found next to this package, so the API, `tuneq up` and tests can
migrate from any working directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alembic import command
from alembic.config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    # Passed as an attribute, not a main option: ConfigParser would treat '%' in a password as
    # interpolation.
    cfg.attributes["url"] = url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade_head(url: str) -> None:
    command.upgrade(alembic_config(url), "head")


def main(argv: list[str] | None = None) -> None:
    from core.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m core.migrate", description="Migrate the tuneq database to head.")
    parser.add_argument("--url", help="SQLAlchemy URL (default: TUNEQ_DATABASE_URL / settings)")
    args = parser.parse_args(argv)
    url = args.url or get_settings().resolved_database_url()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    upgrade_head(url)
    print(f"migrated to head: {url.split('@')[-1]}")
    prepare_storage()


def prepare_storage() -> None:
    """Create the S3 bucket a fresh deployment names, so API and workers can write at once."""
    from core.settings import get_settings
    from core.storage import get_storage

    storage = get_storage()
    if hasattr(storage, "ensure_bucket") and storage.ensure_bucket():
        print(f"created bucket: {get_settings().storage_url}")


if __name__ == "__main__":
    main()

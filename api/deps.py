"""Request dependencies: a database session per request, the settings, the artifact store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from core.db import get_sessionmaker
from core.settings import Settings, get_settings
from core.storage import LocalStorage, get_storage


def get_db() -> Iterator[Session]:
    # Routes commit explicitly (a job is committed before it is enqueued); what they leave
    # uncommitted on an error is rolled back here.
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]

"""A fresh labelling store per test: SQLite in a temp dir, and PostgreSQL when ALIGN_TEST_PG_URL is set
(scripts/test.sh starts a throwaway server and sets it)."""

from __future__ import annotations

import os

import pytest

PG_URL = os.environ.get("ALIGN_TEST_PG_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    from labeling.store import Store, metadata

    if request.param == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'labels.db'}")
    if not PG_URL:
        pytest.skip("ALIGN_TEST_PG_URL is not set (scripts/test.sh starts a PostgreSQL for these)")
    from sqlalchemy import create_engine

    engine = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    metadata.drop_all(engine)
    engine.dispose()
    return Store(PG_URL)


"""A fresh labelling store per test: SQLite in a temp dir, and PostgreSQL when ALIGN_TEST_PG_URL is set
(scripts/test.sh starts a throwaway server and sets it). Each PostgreSQL test gets a schema of its own
(the URL's search_path points at it), so tests never see each other's rows, even run in parallel."""

from __future__ import annotations

import os
import uuid

import pytest

PG_URL = os.environ.get("ALIGN_TEST_PG_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    from align.labeling.store import Store

    if request.param == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'labels.db'}")
        return
    if not PG_URL:
        pytest.skip("ALIGN_TEST_PG_URL is not set (scripts/test.sh starts a PostgreSQL for these)")
    from sqlalchemy import create_engine, text

    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    store = Store(f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}")
    try:
        yield store
    finally:
        store.engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

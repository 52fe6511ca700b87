"""INSERT that skips a row whose primary key exists, on every backend."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session


def insert_if_absent(session: Session, model: type[Any], values: dict[str, Any]) -> bool:
    """Insert one row unless its primary key is taken; return whether it was inserted.

    PostgreSQL and SQLite use ``ON CONFLICT DO NOTHING``, so a lost race neither raises nor
    aborts the surrounding transaction. Other backends fall back to a savepoint.
    """
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        module = postgresql if dialect == "postgresql" else sqlite
        # RETURNING tells inserted from skipped; rowcount is not reliable on every driver.
        primary_key = list(model.__table__.primary_key.columns)
        statement = (
            module.insert(model).values(**values).on_conflict_do_nothing().returning(*primary_key)
        )
        return session.execute(statement).first() is not None
    try:
        with session.begin_nested():
            session.execute(insert(model).values(**values))
    except IntegrityError:
        return False
    return True

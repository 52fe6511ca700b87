"""SQLAlchemy models. One module per aggregate would be overkill while there is one table."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.store.types import UTCDateTime

# Explicit constraint names keep migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DeviceKey(Base):
    """One registered App Attest key: what its attestation proved, and its assertion counter."""

    __tablename__ = "device_keys"

    key_id: Mapped[str] = mapped_column(String(44), primary_key=True)
    app_id: Mapped[str] = mapped_column(String(300), index=True)
    environment: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    counter: Mapped[int] = mapped_column(BigInteger)
    receipt: Mapped[bytes] = mapped_column(LargeBinary)
    attestation: Mapped[bytes] = mapped_column(LargeBinary)
    # The instant the attestation was verified as of; re-verification uses it again, since
    # credential certificates live only days.
    verified_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    leaf_fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    intermediate_fingerprint: Mapped[bytes] = mapped_column(LargeBinary)

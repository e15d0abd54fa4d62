"""The SQL catalog (SQLAlchemy 2): models, migrations, and the Catalog API."""

from ._catalog import LEASE_ONLY, Catalog, PriorState, SegmentInfo, SessionInfo, redact_url
from ._migrations import SCHEMA_VERSION

__all__ = ["LEASE_ONLY", "SCHEMA_VERSION", "Catalog", "PriorState", "SegmentInfo", "SessionInfo", "redact_url"]

"""The SQL catalog (SQLAlchemy 2): models, migrations, and the Catalog API."""

from ._catalog import Catalog, SegmentInfo, SessionInfo
from ._migrations import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Catalog", "SegmentInfo", "SessionInfo"]

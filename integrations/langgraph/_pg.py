"""PostgreSQL fast path for the saver's fenced writes: one statement, one round trip.

The generic path (``ConcordiaSaver._owned``) spends a round trip each on BEGIN,
the token check, every insert and COMMIT. On PostgreSQL one autocommitted
statement does it all: a CTE locks the thread's lease row *if* it still holds
this owner's token (``FOR UPDATE``: a takeover's update of that row waits until
the statement commits, so the new owner reads after this write), and the
inserts run only ``WHERE EXISTS`` that row. The statement returns whether the
lease matched; when it did not, nothing was written and the caller raises
OwnershipError.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

__all__ = ["fenced_put", "fenced_writes"]

_LEASE = """
WITH lease AS (
    SELECT 1 AS ok FROM concordia_leases WHERE session_id = :sid AND token = :tok FOR UPDATE
)"""

_PUT = text(_LEASE + """,
blobs AS (
    INSERT INTO concordia_lg_blobs (session_id, checkpoint_ns, channel, version, type, blob)
    SELECT :sid, :ns, x.channel, x.version, x.type, x.blob
    FROM unnest(CAST(:b_channel AS text[]), CAST(:b_version AS text[]), CAST(:b_type AS text[]),
                CAST(:b_blob AS bytea[])) AS x(channel, version, type, blob)
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (session_id, checkpoint_ns, channel, version)
    DO UPDATE SET type = EXCLUDED.type, blob = EXCLUDED.blob
),
ckpt AS (
    INSERT INTO concordia_lg_checkpoints (session_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type,
        checkpoint, metadata_type, metadata, channel_versions, run_id, uses_delta, created_at)
    SELECT :sid, :ns, :cid, :parent, :type, :checkpoint, :mtype, :metadata, CAST(:versions AS jsonb), :run_id,
        :uses_delta, :created_at
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (session_id, checkpoint_ns, checkpoint_id) DO UPDATE SET
        parent_checkpoint_id = EXCLUDED.parent_checkpoint_id, type = EXCLUDED.type,
        checkpoint = EXCLUDED.checkpoint, metadata_type = EXCLUDED.metadata_type, metadata = EXCLUDED.metadata,
        channel_versions = EXCLUDED.channel_versions, run_id = EXCLUDED.run_id, uses_delta = EXCLUDED.uses_delta,
        created_at = EXCLUDED.created_at
)
SELECT count(*) FROM lease
""")

_WRITES = text(_LEASE + """,
w AS (
    SELECT * FROM unnest(CAST(:w_idx AS integer[]), CAST(:w_channel AS text[]), CAST(:w_type AS text[]),
                         CAST(:w_blob AS bytea[])) AS x(idx, channel, type, blob)
    WHERE EXISTS (SELECT 1 FROM lease)
),
plain AS (
    INSERT INTO concordia_lg_writes (session_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, blob,
        task_path)
    SELECT :sid, :ns, :cid, :task, idx, channel, type, blob, :path FROM w WHERE idx >= 0
    ON CONFLICT (session_id, checkpoint_ns, checkpoint_id, task_id, idx) DO NOTHING
),
special AS (
    INSERT INTO concordia_lg_writes (session_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, blob,
        task_path)
    SELECT :sid, :ns, :cid, :task, idx, channel, type, blob, :path FROM w WHERE idx < 0
    ON CONFLICT (session_id, checkpoint_ns, checkpoint_id, task_id, idx) DO UPDATE SET
        channel = EXCLUDED.channel, type = EXCLUDED.type, blob = EXCLUDED.blob, task_path = EXCLUDED.task_path
)
SELECT count(*) FROM lease
""")


def fenced_put(conn: Connection, token: int, row: dict[str, Any], blobs: list[dict[str, Any]]) -> bool:
    """Store a checkpoint row and its blobs if ``token`` still owns the thread;
    returns whether it did. ``conn`` must be in autocommit mode."""
    params = {
        "sid": row["session_id"], "tok": token, "ns": row["checkpoint_ns"], "cid": row["checkpoint_id"],
        "parent": row["parent_checkpoint_id"], "type": row["type"], "checkpoint": row["checkpoint"],
        "mtype": row["metadata_type"], "metadata": row["metadata"], "versions": json.dumps(row["channel_versions"]),
        "run_id": row["run_id"], "uses_delta": row["uses_delta"], "created_at": row["created_at"],
        "b_channel": [b["channel"] for b in blobs], "b_version": [b["version"] for b in blobs],
        "b_type": [b["type"] for b in blobs], "b_blob": [b["blob"] for b in blobs],
    }
    return bool(conn.execute(_PUT, params).scalar_one())


def fenced_writes(conn: Connection, token: int, rows: list[dict[str, Any]]) -> bool:
    """Store pending writes (insert-or-ignore; special channels upsert) if
    ``token`` still owns the thread; returns whether it did."""
    first = rows[0]
    params = {
        "sid": first["session_id"], "tok": token, "ns": first["checkpoint_ns"], "cid": first["checkpoint_id"],
        "task": first["task_id"], "path": first["task_path"],
        "w_idx": [r["idx"] for r in rows], "w_channel": [r["channel"] for r in rows],
        "w_type": [r["type"] for r in rows], "w_blob": [r["blob"] for r in rows],
    }
    return bool(conn.execute(_WRITES, params).scalar_one())

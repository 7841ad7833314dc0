//! The SuperLink's own view of its SuperNodes, read from Flower's SQLite state
//! (`flower-superlink --database`), for `FL_NODES_ONLINE` (#12 item 4c).
//!
//! Owns: opening Flower's database read-only, and the queries of its `node` table.
//! Must not: write the database (it is opened read-only), or block the supervisor on
//! Flower's locks (a short busy timeout; the caller runs it on a blocking thread).
//!
//! Assumptions (checked in flwr 1.25's `server/superlink/linkstate/sqlite_linkstate.py`):
//! table `node` has `node_id` (the uint64 id stored as the two's-complement sint64,
//! `uint64_to_int64`), `status` (`online` / `offline` / `registered` / `unregistered`)
//! and `online_until` (a Unix time, REAL). `activate_node` and each Fleet heartbeat set
//! `online_until = now + 2 × heartbeat interval` (HEARTBEAT_PATIENCE × the SuperNode's
//! fixed 30 s); a node turns `offline` lazily, on the next read, once that passed; a
//! graceful stop (`deactivate_node`) sets it `offline` at once. So online means
//! `status = 'online' AND online_until > now` — a killed SuperNode drops out of the list
//! at most 60 s after its last Flower heartbeat.
//! Shown by `linkstate::tests::online_means_status_online_and_not_yet_expired` and, against
//! real Flower, `tests/safety_flower.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::protocol::nodes::MAX_NODES;

/// Why no list of online nodes could be read.
#[derive(Debug, thiserror::Error)]
pub enum LinkStateError {
    /// SQLite could not open or query the database (not written yet, locked, another
    /// schema).
    #[error("reading Flower's state {}: {source}", path.display())]
    Read {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// More nodes online than one list may carry.
    #[error("more than {MAX_NODES} SuperNodes online")]
    TooMany,
}

/// The Flower node ids `db` holds online at `now` (Unix seconds). At most [`MAX_NODES`]
/// (more is an error: the list would be cut and a listed node look offline).
pub fn online_nodes(db: &Path, now: f64) -> Result<BTreeSet<u64>, LinkStateError> {
    let fail = |source| LinkStateError::Read {
        path: db.to_path_buf(),
        source,
    };
    let conn = open(db).map_err(fail)?;
    let ids = online_set(&conn, now).map_err(fail)?;
    if ids.len() > MAX_NODES {
        return Err(LinkStateError::TooMany);
    }
    Ok(ids)
}

/// Opens Flower's database read-only, with a short busy timeout. Never creates it: a
/// SuperLink that has not written its state yet has nothing to tell.
pub fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(500))?;
    Ok(conn)
}

/// The node ids `conn` holds online at `now`: at most [`MAX_NODES`] + 1, so that a caller
/// can tell a complete list from a cut one.
pub fn online_set(conn: &Connection, now: f64) -> rusqlite::Result<BTreeSet<u64>> {
    let mut stmt = conn.prepare(
        "SELECT node_id FROM node WHERE status = 'online' AND online_until > ?1 \
         ORDER BY node_id LIMIT ?2",
    )?;
    let rows = stmt.query_map((now, MAX_NODES as i64 + 1), |r| r.get::<_, i64>(0))?;
    // Flower's int64_to_uint64: the two's-complement reinterpretation.
    rows.map(|id| id.map(|id| id as u64)).collect()
}

/// How many SuperNodes `conn` holds online at `now` (the same rule as [`online_nodes`]).
pub fn online_count(conn: &Connection, now: f64) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT count(*) FROM node WHERE status = 'online' AND online_until > ?1",
        [now],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_means_status_online_and_not_yet_expired() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        assert!(online_nodes(&db, 0.0).is_err(), "no state yet: no list");
        assert!(!db.exists(), "never created");
        let conn = Connection::open(&db).unwrap();
        // The columns the query reads, as flwr 1.25 declares them (WAL, as Flower runs it).
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE node(node_id INTEGER UNIQUE, status TEXT, online_until TIMESTAMP NULL);",
        )
        .unwrap();
        let big = 15644467414316882310u64; // stored as a negative sint64
        for (id, status, until) in [
            (7i64, "online", Some(1000.5)),
            (big as i64, "online", Some(2000.0)),
            (8, "online", Some(999.0)), // expired, not yet tagged offline
            (9, "offline", Some(5000.0)), // deactivated
            (10, "registered", None),   // never activated
            (11, "unregistered", Some(5000.0)),
        ] {
            conn.execute("INSERT INTO node VALUES (?1, ?2, ?3)", (id, status, until))
                .unwrap();
        }
        // Flower keeps its connection open while the agent reads.
        assert_eq!(online_nodes(&db, 1000.0).unwrap(), BTreeSet::from([7, big]));
        assert_eq!(online_nodes(&db, 1000.5).unwrap(), BTreeSet::from([big]));
        drop(conn);
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE x(y);")
            .unwrap();
        assert!(online_nodes(&other, 0.0)
            .unwrap_err()
            .to_string()
            .contains("no such table"));
    }
}

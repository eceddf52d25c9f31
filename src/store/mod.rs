//! The agent's durable memory: VM records, tasks and their step journal, IP allocations and
//! template checks, in one embedded SQLite database.
//!
//! SQLite runs in WAL mode with `synchronous=FULL`, so a commit that returned is on disk
//! before the agent takes its next step; a task journal written here survives SIGKILL and
//! power loss. One connection serves the whole agent: every call runs on the blocking pool
//! (`Store::call`) behind a mutex, which also makes each multi-statement transaction atomic
//! with respect to concurrent requests. The schema is versioned by `PRAGMA user_version` and
//! migrated forward at open.

pub mod networks;
mod schema;
pub mod snapshots;
pub mod tasks;
pub mod vms;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use networks::{MemberRow, NetworkRow};
pub use snapshots::{SnapshotRow, SnapshotState};
pub use tasks::{NewTask, StepRow, StepState, TaskFilter, TaskRow, TaskState};
pub use vms::{Allocation, IpAllocation, VmRow, VmRowState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state database {path} is unusable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database worker failed: {0}")]
    Worker(String),
    #[error("record is malformed: {0}")]
    Malformed(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating when absent) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
            }
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        restrict_permissions(path);
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| corrupt(e.to_string()))?;
        if check != "ok" {
            return Err(corrupt(check));
        }
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;",
        )
        .map_err(|e| corrupt(e.to_string()))?;
        schema::migrate(&conn).map_err(|e| corrupt(e.to_string()))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Worker("connection mutex poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }

    /// Runs `f` synchronously (for code already on a blocking thread, and tests).
    pub fn call_sync<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| StoreError::Worker("connection mutex poisoned".into()))?;
        f(&mut guard)
    }
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if path == Path::new(":memory:") {
        return;
    }
    // The database holds password hashes and webhook secrets.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

/// A private in-memory store for unit tests.
#[cfg(test)]
pub(crate) fn test_store() -> Store {
    Store::open(Path::new(":memory:")).expect("open test store")
}

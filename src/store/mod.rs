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
pub mod power;
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
    #[error(
        "state database {db} is new or empty, but the VM directory {vm_dir} holds the VMs of \
         another store ({found}). Starting would forget every VM, disk and address on this \
         host. Restore {db} from its backup; to start over on purpose, remove {marker} (the \
         old VMs are then reported as unknown domains)"
    )]
    Lost {
        db: PathBuf,
        vm_dir: PathBuf,
        marker: PathBuf,
        found: String,
    },
    #[error(
        "state database {db} (store {ours}) is not the one the VM directory {vm_dir} belongs \
         to (store {theirs}); check storage.state_db and storage.vm_dir"
    )]
    Mismatch {
        db: PathBuf,
        vm_dir: PathBuf,
        ours: String,
        theirs: String,
    },
    #[error("cannot record the store's identity in {path}: {source}")]
    Marker {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// This open created the schema: the file was absent, empty or wiped.
    created: bool,
}

/// The file in the VM directory naming the store that owns it.
pub const MARKER: &str = ".hvnode-store-id";

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
        let applied_before = schema::migrate(&conn).map_err(|e| corrupt(e.to_string()))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
            created: applied_before == 0,
        })
    }

    /// The store's random identity, made when its schema was created.
    pub fn id(&self) -> Result<String> {
        self.call_sync(|c| {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
                    r.get(0)
                })?,
            )
        })
    }

    /// Ties the VM directory to this store, or refuses when it belongs to another: a store
    /// that is new (deleted, truncated, replaced by an empty file) next to a VM directory
    /// that an earlier store filled means the agent would forget every VM it manages.
    /// A VM directory without a marker but with VM subdirectories counts as filled.
    pub fn claim_dir(&self, vm_dir: &Path) -> Result<()> {
        let marker = vm_dir.join(MARKER);
        let ours = self.id()?;
        let marker_err = |source| StoreError::Marker {
            path: marker.clone(),
            source,
        };
        match std::fs::read_to_string(&marker) {
            Ok(theirs) if theirs.trim() == ours => Ok(()),
            Ok(theirs) if self.created => Err(StoreError::Lost {
                db: self.path.clone(),
                vm_dir: vm_dir.to_owned(),
                marker,
                found: format!("store {}", theirs.trim()),
            }),
            Ok(theirs) => Err(StoreError::Mismatch {
                db: self.path.clone(),
                vm_dir: vm_dir.to_owned(),
                ours,
                theirs: theirs.trim().to_owned(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let vms = vm_subdirs(vm_dir);
                if self.created && vms > 0 {
                    return Err(StoreError::Lost {
                        db: self.path.clone(),
                        vm_dir: vm_dir.to_owned(),
                        marker,
                        found: format!("{vms} VM directories, no marker"),
                    });
                }
                std::fs::create_dir_all(vm_dir).map_err(marker_err)?;
                let partial = vm_dir.join(format!("{MARKER}.partial"));
                std::fs::write(&partial, format!("{ours}\n"))
                    .and_then(|()| std::fs::rename(&partial, &marker))
                    .map_err(marker_err)
            }
            Err(e) => Err(marker_err(e)),
        }
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

/// Refuses, before anything is created, a state database that is missing or empty next
/// to a VM directory that a store has claimed (or that holds VMs): opening it would make a
/// new, empty store and forget the host's VMs.
pub fn check_not_lost(db: &Path, vm_dir: &Path) -> Result<()> {
    let empty = std::fs::metadata(db).map(|m| m.len() == 0).unwrap_or(true);
    if !empty {
        return Ok(());
    }
    let marker = vm_dir.join(MARKER);
    let found = match std::fs::read_to_string(&marker) {
        Ok(id) => format!("store {}", id.trim()),
        Err(_) => match vm_subdirs(vm_dir) {
            0 => return Ok(()),
            n => format!("{n} VM directories, no marker"),
        },
    };
    Err(StoreError::Lost {
        db: db.to_owned(),
        vm_dir: vm_dir.to_owned(),
        marker,
        found,
    })
}

/// Subdirectories of the VM directory named like VM ids.
fn vm_subdirs(vm_dir: &Path) -> usize {
    std::fs::read_dir(vm_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| uuid::Uuid::parse_str(n).is_ok())
                })
                .count()
        })
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hvnode.db");
        let vms = dir.path().join("vms");
        (dir, db, vms)
    }

    #[test]
    fn a_new_store_claims_an_empty_vm_directory() {
        let (_d, db, vms) = dirs();
        let store = Store::open(&db).unwrap();

        store.claim_dir(&vms).unwrap();

        let marker = std::fs::read_to_string(vms.join(MARKER)).unwrap();
        assert_eq!(marker.trim(), store.id().unwrap());
    }

    #[test]
    fn the_same_store_opened_again_is_accepted() {
        let (_d, db, vms) = dirs();
        Store::open(&db).unwrap().claim_dir(&vms).unwrap();

        let again = Store::open(&db).unwrap();

        assert!(again.claim_dir(&vms).is_ok());
    }

    #[test]
    fn a_deleted_store_is_refused_instead_of_forgetting_the_vms() {
        let (_d, db, vms) = dirs();
        Store::open(&db).unwrap().claim_dir(&vms).unwrap();
        std::fs::remove_file(&db).unwrap();

        let err = Store::open(&db).unwrap().claim_dir(&vms).unwrap_err();

        assert!(matches!(err, StoreError::Lost { .. }), "{err}");
        assert!(err.to_string().contains("Restore"), "{err}");
    }

    #[test]
    fn a_deleted_store_is_refused_before_a_new_one_is_created() {
        let (_d, db, vms) = dirs();
        Store::open(&db).unwrap().claim_dir(&vms).unwrap();
        std::fs::remove_file(&db).unwrap();

        let err = check_not_lost(&db, &vms).unwrap_err();

        assert!(matches!(err, StoreError::Lost { .. }), "{err}");
        assert!(!db.exists());
    }

    #[test]
    fn a_first_start_is_not_a_lost_store() {
        let (_d, db, vms) = dirs();

        assert!(check_not_lost(&db, &vms).is_ok());
    }

    #[test]
    fn a_store_truncated_to_nothing_is_refused() {
        let (_d, db, vms) = dirs();
        Store::open(&db).unwrap().claim_dir(&vms).unwrap();
        std::fs::write(&db, b"").unwrap();
        let _ = std::fs::remove_file(db.with_extension("db-wal"));

        let err = Store::open(&db).unwrap().claim_dir(&vms).unwrap_err();

        assert!(matches!(err, StoreError::Lost { .. }), "{err}");
    }

    #[test]
    fn a_corrupted_store_is_refused_at_open() {
        let (_d, db, _vms) = dirs();
        Store::open(&db).unwrap();
        std::fs::write(&db, vec![0x5a; 8192]).unwrap();

        let err = Store::open(&db).err().expect("refused");

        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn another_store_is_refused() {
        let (d, db, vms) = dirs();
        Store::open(&db).unwrap().claim_dir(&vms).unwrap();
        let other = Store::open(&d.path().join("other.db")).unwrap();
        other
            .call_sync(|c| {
                c.execute("UPDATE meta SET value = 'x' WHERE key = 'store_id'", [])?;
                Ok(())
            })
            .unwrap();
        // An established store (not new) pointed at a directory it does not own.
        let other = Store::open(&d.path().join("other.db")).unwrap();

        let err = other.claim_dir(&vms).unwrap_err();

        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn vm_directories_without_a_marker_count_as_filled() {
        let (_d, db, vms) = dirs();
        std::fs::create_dir_all(vms.join(uuid::Uuid::new_v4().to_string())).unwrap();

        let err = Store::open(&db).unwrap().claim_dir(&vms).unwrap_err();

        assert!(matches!(err, StoreError::Lost { .. }), "{err}");
    }
}

//! Snapshot records: the name, description and kind of each internal snapshot in a VM's
//! disk. A record is written (`creating`) when a snapshot is admitted, which reserves its
//! name and its place under the per-VM limit, and becomes `ready` once the disk holds it.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{Result, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Admitted; the disk may or may not hold it yet.
    Creating,
    Ready,
}

impl SnapshotState {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
        }
    }

    fn parse(s: &str) -> Result<SnapshotState> {
        match s {
            "creating" => Ok(SnapshotState::Creating),
            "ready" => Ok(SnapshotState::Ready),
            other => Err(StoreError::Malformed(format!("snapshot state {other:?}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub vps_id: Uuid,
    pub name: String,
    pub description: String,
    /// Holds the guest's memory and device state as well as the disk.
    pub vmstate: bool,
    pub state: SnapshotState,
    /// The disk's virtual size when the snapshot was taken.
    pub disk_bytes: u64,
    pub created_at: String,
}

fn row(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, String, bool, String, i64, String)> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn decode(
    (vps_id, name, description, vmstate, state, disk_bytes, created_at): (
        String,
        String,
        String,
        bool,
        String,
        i64,
        String,
    ),
) -> Result<SnapshotRow> {
    Ok(SnapshotRow {
        vps_id: vps_id
            .parse()
            .map_err(|_| StoreError::Malformed(format!("uuid {vps_id:?}")))?,
        name,
        description,
        vmstate,
        state: SnapshotState::parse(&state)?,
        disk_bytes: disk_bytes.max(0) as u64,
        created_at,
    })
}

const COLUMNS: &str = "vps_id, name, description, vmstate, state, disk_bytes, created_at";

pub fn insert(conn: &Connection, s: &SnapshotRow) -> Result<()> {
    conn.execute(
        &format!("INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
        params![
            s.vps_id.to_string(),
            s.name,
            s.description,
            s.vmstate,
            s.state.as_str(),
            s.disk_bytes as i64,
            s.created_at
        ],
    )?;
    Ok(())
}

/// Every record of `vps_id`, oldest first, whatever its state.
pub fn list(conn: &Connection, vps_id: Uuid) -> Result<Vec<SnapshotRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM snapshots WHERE vps_id = ?1 ORDER BY created_at, name"
    ))?;
    let rows = stmt
        .query_map([vps_id.to_string()], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(decode).collect()
}

pub fn get(conn: &Connection, vps_id: Uuid, name: &str) -> Result<Option<SnapshotRow>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM snapshots WHERE vps_id = ?1 AND name = ?2"),
        params![vps_id.to_string(), name],
        row,
    )
    .optional()?
    .map(decode)
    .transpose()
}

pub fn set_ready(conn: &Connection, vps_id: Uuid, name: &str, vmstate: bool) -> Result<()> {
    conn.execute(
        "UPDATE snapshots SET state = 'ready', vmstate = ?3 WHERE vps_id = ?1 AND name = ?2",
        params![vps_id.to_string(), name, vmstate],
    )?;
    Ok(())
}

pub fn delete(conn: &Connection, vps_id: Uuid, name: &str) -> Result<()> {
    conn.execute(
        "DELETE FROM snapshots WHERE vps_id = ?1 AND name = ?2",
        params![vps_id.to_string(), name],
    )?;
    Ok(())
}

/// Forgets every snapshot of `vps_id` (its disk is gone or was re-cloned).
pub fn delete_all(conn: &Connection, vps_id: Uuid) -> Result<usize> {
    Ok(conn.execute(
        "DELETE FROM snapshots WHERE vps_id = ?1",
        [vps_id.to_string()],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    fn snap(vm: Uuid, name: &str) -> SnapshotRow {
        SnapshotRow {
            vps_id: vm,
            name: name.into(),
            description: "before <upgrade> & \"more\"".into(),
            vmstate: false,
            state: SnapshotState::Creating,
            disk_bytes: 4 << 30,
            created_at: format!("2026-11-23T12:00:0{}Z", name.len()),
        }
    }

    #[test]
    fn names_are_unique_per_vm_and_states_round_trip() {
        let store = test_store();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        store
            .call_sync(|c| {
                insert(c, &snap(a, "s1"))?;
                insert(c, &snap(b, "s1"))?;
                assert!(insert(c, &snap(a, "s1")).is_err(), "duplicate name");
                insert(c, &snap(a, "s22"))?;
                set_ready(c, a, "s1", true)?;
                let got = get(c, a, "s1")?.unwrap();
                assert_eq!((got.state, got.vmstate), (SnapshotState::Ready, true));
                assert_eq!(got.description, "before <upgrade> & \"more\"");
                let names: Vec<_> = list(c, a)?.into_iter().map(|s| s.name).collect();
                assert_eq!(names, ["s1", "s22"]);
                delete(c, a, "s1")?;
                assert!(get(c, a, "s1")?.is_none());
                assert_eq!(delete_all(c, a)?, 1);
                assert_eq!(list(c, b)?.len(), 1);
                Ok(())
            })
            .unwrap();
    }
}

//! What each VM should be doing: the power state the control plane last asked for, whether
//! it comes back by itself (host reboot, QEMU died), and why it last stopped.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{Result, StoreError};

/// The power state the control plane (or the customer, from inside the guest) last chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Intended {
    Running,
    Stopped,
    Paused,
}

/// Why a VM last stopped. Kept while it runs again, as its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop through the API.
    Requested,
    /// The guest powered itself off (the customer ran `poweroff`): it stays off.
    GuestPoweroff,
    /// QEMU ended without being asked (crash, OOM killer, a kill from outside).
    QemuCrashed,
    /// Someone outside the agent pulled the plug (`virsh destroy`).
    DestroyedOutside,
    /// The agent found it off at its start (the host rebooted).
    HostReboot,
    /// QEMU kept dying: restarted `autorestart.max_restarts` times within the window, then
    /// left stopped.
    GaveUp,
}

macro_rules! names {
    ($t:ty { $($v:ident = $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(<$t>::$v),)* _ => None }
            }
        }
    };
}

names!(Intended {
    Running = "running",
    Stopped = "stopped",
    Paused = "paused",
});

names!(StopReason {
    Requested = "requested",
    GuestPoweroff = "guest_poweroff",
    QemuCrashed = "qemu_crashed",
    DestroyedOutside = "destroyed_outside",
    HostReboot = "host_reboot",
    GaveUp = "gave_up",
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Power {
    pub vps_id: Uuid,
    pub intended: Intended,
    pub autostart: bool,
    pub last_stop_reason: Option<StopReason>,
}

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, bool, Option<String>)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn finish(
    (id, intended, autostart, reason): (String, String, bool, Option<String>),
) -> Result<Power> {
    let bad = |what: &str| StoreError::Malformed(format!("power of {id}: {what}"));
    Ok(Power {
        vps_id: id.parse().map_err(|_| bad("id"))?,
        intended: Intended::parse(&intended).ok_or_else(|| bad(&intended))?,
        autostart,
        last_stop_reason: match reason {
            Some(r) => Some(StopReason::parse(&r).ok_or_else(|| bad(&r))?),
            None => None,
        },
    })
}

const COLUMNS: &str = "vps_id, intended, autostart, last_stop_reason";

/// `None`: a VM from before the agent recorded intents (see `adopt`).
pub fn get(conn: &Connection, id: Uuid) -> Result<Option<Power>> {
    let sql = format!("SELECT {COLUMNS} FROM power WHERE vps_id = ?1");
    conn.query_row(&sql, [id.to_string()], from_row)
        .optional()?
        .map(finish)
        .transpose()
}

/// Every deployed VM with its intent (`None`: from before intents were recorded), in one
/// query: what the keeper reads every interval.
pub fn of_deployed(conn: &Connection) -> Result<Vec<(Uuid, Option<Power>)>> {
    let mut stmt = conn.prepare(
        "SELECT v.id, p.intended, p.autostart, p.last_stop_reason
         FROM vms v LEFT JOIN power p ON p.vps_id = v.id
         WHERE v.state = 'active' ORDER BY v.id",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, Option<String>>(1)?,
            row.get::<_, Option<bool>>(2)?,
            row.get::<_, Option<String>>(3)?,
        ))
    })?;
    rows.map(|r| {
        let (id, intended, autostart, reason) = r?;
        let vps_id: Uuid = id
            .parse()
            .map_err(|_| StoreError::Malformed(format!("vm id {id:?}")))?;
        let power = match intended {
            Some(intended) => Some(finish((id, intended, autostart.unwrap_or(true), reason))?),
            None => None,
        };
        Ok((vps_id, power))
    })
    .collect()
}

/// A new VM's row: it should run once deployed.
pub fn insert(conn: &Connection, id: Uuid, autostart: bool, now: &str) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO power (vps_id, intended, autostart, last_stop_reason, updated_at)
         VALUES (?1, 'running', ?2, NULL, ?3)",
        params![id.to_string(), autostart, now],
    )?;
    Ok(())
}

/// Records what was asked; `reason` (for a stop) replaces the last one, `None` keeps it.
pub fn set_intended(
    conn: &Connection,
    id: Uuid,
    intended: Intended,
    reason: Option<StopReason>,
    now: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO power (vps_id, intended, autostart, last_stop_reason, updated_at)
         VALUES (?1, ?2, 1, ?3, ?4)
         ON CONFLICT (vps_id) DO UPDATE SET intended = ?2,
            last_stop_reason = COALESCE(?3, last_stop_reason), updated_at = ?4",
        params![
            id.to_string(),
            intended.as_str(),
            reason.map(StopReason::as_str),
            now
        ],
    )?;
    Ok(())
}

/// Records why the VM is off now, leaving what was asked as it is.
pub fn set_stop_reason(conn: &Connection, id: Uuid, reason: StopReason, now: &str) -> Result<()> {
    conn.execute(
        "UPDATE power SET last_stop_reason = ?2, updated_at = ?3 WHERE vps_id = ?1",
        params![id.to_string(), reason.as_str(), now],
    )?;
    Ok(())
}

pub fn set_autostart(conn: &Connection, id: Uuid, autostart: bool, now: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO power (vps_id, intended, autostart, last_stop_reason, updated_at)
         VALUES (?1, 'running', ?2, NULL, ?3)
         ON CONFLICT (vps_id) DO UPDATE SET autostart = ?2, updated_at = ?3",
        params![id.to_string(), autostart, now],
    )?;
    Ok(())
}

pub fn delete(conn: &Connection, id: Uuid) -> Result<()> {
    conn.execute("DELETE FROM power WHERE vps_id = ?1", [id.to_string()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&conn).unwrap();
        conn
    }

    #[test]
    fn intent_and_reason_round_trip() {
        let conn = db();
        let id = Uuid::new_v4();
        assert_eq!(get(&conn, id).unwrap(), None);
        insert(&conn, id, false, "t0").unwrap();
        let p = get(&conn, id).unwrap().unwrap();
        assert_eq!(
            (p.intended, p.autostart, p.last_stop_reason),
            (Intended::Running, false, None)
        );
        set_intended(
            &conn,
            id,
            Intended::Stopped,
            Some(StopReason::GuestPoweroff),
            "t1",
        )
        .unwrap();
        set_intended(&conn, id, Intended::Running, None, "t2").unwrap();
        let p = get(&conn, id).unwrap().unwrap();
        assert_eq!(p.intended, Intended::Running);
        assert_eq!(p.last_stop_reason, Some(StopReason::GuestPoweroff), "kept");
        set_autostart(&conn, id, true, "t3").unwrap();
        assert!(get(&conn, id).unwrap().unwrap().autostart);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM power", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        delete(&conn, id).unwrap();
        assert_eq!(get(&conn, id).unwrap(), None);
    }

    #[test]
    fn the_keeper_reads_every_deployed_vm_with_its_intent_at_once() {
        use super::super::vms::{self, tests::sample, VmRowState};
        let conn = db();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            vms::insert(&conn, &sample(*id, &format!("52:54:00:00:00:0{i}"))).unwrap();
        }
        // 0: deployed with an intent; 1: deployed before intents were recorded; 2: still
        // deploying (not the keeper's).
        vms::set_state(&conn, ids[0], VmRowState::Active, "t").unwrap();
        vms::set_state(&conn, ids[1], VmRowState::Active, "t").unwrap();
        insert(&conn, ids[0], false, "t").unwrap();
        set_intended(&conn, ids[0], Intended::Paused, None, "t").unwrap();
        insert(&conn, ids[2], true, "t").unwrap();
        let mut got = of_deployed(&conn).unwrap();
        got.sort_by_key(|(id, _)| *id);
        let mut want = vec![
            (
                ids[0],
                Some(Power {
                    vps_id: ids[0],
                    intended: Intended::Paused,
                    autostart: false,
                    last_stop_reason: None,
                }),
            ),
            (ids[1], None),
        ];
        want.sort_by_key(|(id, _)| *id);
        assert_eq!(got, want);
    }

    #[test]
    fn every_name_parses_back() {
        for i in [Intended::Running, Intended::Stopped, Intended::Paused] {
            assert_eq!(Intended::parse(i.as_str()), Some(i));
        }
        for r in [
            StopReason::Requested,
            StopReason::GuestPoweroff,
            StopReason::QemuCrashed,
            StopReason::DestroyedOutside,
            StopReason::HostReboot,
            StopReason::GaveUp,
        ] {
            assert_eq!(StopReason::parse(r.as_str()), Some(r));
        }
    }
}

//! VM records and the IP addresses they hold.

use std::net::IpAddr;

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::Uuid;

use super::{Result, StoreError};

/// The agent's lifecycle record of a VM. Whether it runs is libvirt's to say; this says what
/// the agent has done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRowState {
    /// Created by the control plane, its create task has not finished.
    Deploying,
    /// Deployed; its power state is read from libvirt.
    Active,
    /// Its create task failed and was unwound: only this record is left.
    Failed,
}

impl VmRowState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmRowState::Deploying => "deploying",
            VmRowState::Active => "active",
            VmRowState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "deploying" => VmRowState::Deploying,
            "active" => VmRowState::Active,
            "failed" => VmRowState::Failed,
            other => return Err(StoreError::Malformed(format!("vm state {other:?}"))),
        })
    }
}

#[derive(Clone, PartialEq)]
pub struct VmRow {
    pub id: Uuid,
    pub hostname: String,
    pub template_id: String,
    pub cpu_cores: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
    pub bandwidth_mbps: Option<u32>,
    /// SHA-512 crypt of the root password; the password itself is never stored.
    pub password_hash: String,
    pub ssh_keys: Vec<String>,
    pub ip_address: Option<IpAddr>,
    pub mac: String,
    pub state: VmRowState,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    /// cloud-init instance-id; a new one makes cloud-init run again (reinstall).
    pub instance_id: String,
    /// SHA-256 of the create request without its password, to recognise a repeated create.
    pub request_digest: String,
    pub created_at: String,
    pub updated_at: String,
    pub deployed_at: Option<String>,
}

impl std::fmt::Debug for VmRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRow")
            .field("id", &self.id)
            .field("hostname", &self.hostname)
            .field("state", &self.state)
            .field("ip_address", &self.ip_address)
            .finish_non_exhaustive()
    }
}

const VM_COLUMNS: &str = "id, hostname, template_id, cpu_cores, ram_mb, disk_gb, bandwidth_mbps,
    password_hash, ssh_keys, ip_address, mac, state, webhook_url, webhook_secret, instance_id,
    request_digest, created_at, updated_at, deployed_at";

fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<(VmRow, String, String, Option<String>, String)> {
    let id: String = row.get(0)?;
    let ssh_keys: String = row.get(8)?;
    let ip: Option<String> = row.get(9)?;
    let state: String = row.get(11)?;
    Ok((
        VmRow {
            id: Uuid::nil(),
            hostname: row.get(1)?,
            template_id: row.get(2)?,
            cpu_cores: row.get(3)?,
            ram_mb: row.get(4)?,
            disk_gb: row.get(5)?,
            bandwidth_mbps: row.get(6)?,
            password_hash: row.get(7)?,
            ssh_keys: Vec::new(),
            ip_address: None,
            mac: row.get(10)?,
            state: VmRowState::Deploying,
            webhook_url: row.get(12)?,
            webhook_secret: row.get(13)?,
            instance_id: row.get(14)?,
            request_digest: row.get(15)?,
            created_at: row.get(16)?,
            updated_at: row.get(17)?,
            deployed_at: row.get(18)?,
        },
        id,
        ssh_keys,
        ip,
        state,
    ))
}

fn finish_vm(
    (mut vm, id, keys, ip, state): (VmRow, String, String, Option<String>, String),
) -> Result<VmRow> {
    vm.id = id
        .parse()
        .map_err(|_| StoreError::Malformed(format!("vm id {id:?}")))?;
    vm.ssh_keys = serde_json::from_str(&keys)
        .map_err(|e| StoreError::Malformed(format!("ssh_keys of {id}: {e}")))?;
    vm.ip_address = match ip {
        Some(s) => Some(
            s.parse()
                .map_err(|_| StoreError::Malformed(format!("ip of {id}: {s:?}")))?,
        ),
        None => None,
    };
    vm.state = VmRowState::parse(&state)?;
    Ok(vm)
}

pub fn get(conn: &Connection, id: Uuid) -> Result<Option<VmRow>> {
    let sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1");
    let raw = conn
        .query_row(&sql, [id.to_string()], vm_from_row)
        .optional()?;
    raw.map(finish_vm).transpose()
}

pub fn list(conn: &Connection) -> Result<Vec<VmRow>> {
    let sql = format!("SELECT {VM_COLUMNS} FROM vms ORDER BY created_at, id");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], vm_from_row)?;
    rows.map(|r| finish_vm(r?)).collect()
}

/// The ids of every VM record.
pub fn ids(conn: &Connection) -> Result<Vec<Uuid>> {
    let mut stmt = conn.prepare("SELECT id FROM vms")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        if let Ok(id) = r?.parse::<Uuid>() {
            out.push(id);
        }
    }
    Ok(out)
}

pub fn insert(conn: &Connection, vm: &VmRow) -> Result<()> {
    let sql = format!(
        "INSERT INTO vms ({VM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
         ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
    );
    conn.execute(
        &sql,
        params![
            vm.id.to_string(),
            vm.hostname,
            vm.template_id,
            vm.cpu_cores,
            vm.ram_mb,
            vm.disk_gb,
            vm.bandwidth_mbps,
            vm.password_hash,
            serde_json::to_string(&vm.ssh_keys).expect("strings serialize"),
            vm.ip_address.map(|a| a.to_string()),
            vm.mac,
            vm.state.as_str(),
            vm.webhook_url,
            vm.webhook_secret,
            vm.instance_id,
            vm.request_digest,
            vm.created_at,
            vm.updated_at,
            vm.deployed_at,
        ],
    )?;
    Ok(())
}

pub fn set_state(conn: &Connection, id: Uuid, state: VmRowState, now: &str) -> Result<()> {
    let deployed = (state == VmRowState::Active).then_some(now);
    conn.execute(
        "UPDATE vms SET state = ?2, updated_at = ?3,
            deployed_at = COALESCE(deployed_at, ?4) WHERE id = ?1",
        params![id.to_string(), state.as_str(), now, deployed],
    )?;
    Ok(())
}

/// A reinstall: new template, credentials and cloud-init instance; same id, MAC and IPs.
pub fn set_install(
    conn: &Connection,
    id: Uuid,
    template_id: &str,
    password_hash: &str,
    ssh_keys: &[String],
    instance_id: &str,
    now: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE vms SET template_id = ?2, password_hash = ?3, ssh_keys = ?4, instance_id = ?5,
            updated_at = ?6 WHERE id = ?1",
        params![
            id.to_string(),
            template_id,
            password_hash,
            serde_json::to_string(ssh_keys).expect("strings serialize"),
            instance_id,
            now
        ],
    )?;
    Ok(())
}

pub fn set_resources(
    conn: &Connection,
    id: Uuid,
    cpu_cores: u32,
    ram_mb: u64,
    disk_gb: u64,
    now: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE vms SET cpu_cores = ?2, ram_mb = ?3, disk_gb = ?4, updated_at = ?5 WHERE id = ?1",
        params![id.to_string(), cpu_cores, ram_mb, disk_gb, now],
    )?;
    Ok(())
}

pub fn set_instance_id(conn: &Connection, id: Uuid, instance_id: &str, now: &str) -> Result<()> {
    conn.execute(
        "UPDATE vms SET instance_id = ?2, updated_at = ?3 WHERE id = ?1",
        params![id.to_string(), instance_id, now],
    )?;
    Ok(())
}

pub fn touch(conn: &Connection, id: Uuid, now: &str) -> Result<()> {
    conn.execute(
        "UPDATE vms SET updated_at = ?2 WHERE id = ?1",
        params![id.to_string(), now],
    )?;
    Ok(())
}

pub fn delete(conn: &Connection, id: Uuid) -> Result<()> {
    conn.execute("DELETE FROM vms WHERE id = ?1", [id.to_string()])?;
    conn.execute(
        "DELETE FROM ip_allocations WHERE vps_id = ?1",
        [id.to_string()],
    )?;
    super::snapshots::delete_all(conn, id)?;
    super::networks::delete_members_of_vm(conn, id)?;
    super::power::delete(conn, id)?;
    Ok(())
}

pub fn mac_in_use(conn: &Connection, mac: &str) -> Result<bool> {
    Ok(conn
        .query_row("SELECT 1 FROM vms WHERE mac = ?1", [mac], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Resources promised to VMs that exist or are being deployed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Allocation {
    pub vms: u64,
    pub cpu_cores: u64,
    pub ram_mb: u64,
    pub disk_gb: u64,
    /// What the VMs' snapshots held on disk when last measured.
    pub snapshot_bytes: u64,
}

pub fn allocation(conn: &Connection) -> Result<Allocation> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(cpu_cores), 0), COALESCE(SUM(ram_mb), 0),
                COALESCE(SUM(disk_gb), 0), COALESCE(SUM(snapshot_bytes), 0)
         FROM vms WHERE state != 'failed'",
        [],
        |r| {
            Ok(Allocation {
                vms: r.get::<_, i64>(0)? as u64,
                cpu_cores: r.get::<_, i64>(1)? as u64,
                ram_mb: r.get::<_, i64>(2)? as u64,
                disk_gb: r.get::<_, i64>(3)? as u64,
                snapshot_bytes: r.get::<_, i64>(4)? as u64,
            })
        },
    )?)
}

/// What the VM's snapshots held on disk when last measured.
pub fn snapshot_bytes(conn: &Connection, id: Uuid) -> Result<u64> {
    Ok(conn
        .query_row(
            "SELECT snapshot_bytes FROM vms WHERE id = ?1",
            [id.to_string()],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0) as u64)
}

/// Records what the VM's snapshots hold on disk.
pub fn set_snapshot_bytes(conn: &Connection, id: Uuid, bytes: u64) -> Result<()> {
    conn.execute(
        "UPDATE vms SET snapshot_bytes = ?2 WHERE id = ?1",
        params![id.to_string(), bytes.min(i64::MAX as u64) as i64],
    )?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpAllocation {
    pub address: IpAddr,
    pub vps_id: Uuid,
    /// `primary` or `extra`.
    pub kind: String,
    /// Being taken away from the VM: held (no one else gets it) but no longer the VM's to
    /// send from.
    pub releasing: bool,
}

impl IpAllocation {
    /// Whether the VM may use the address (its filter and seed hold it).
    pub fn usable(&self) -> bool {
        !self.releasing
    }
}

pub fn ip_allocations(conn: &Connection) -> Result<Vec<IpAllocation>> {
    let mut stmt = conn
        .prepare("SELECT address, vps_id, kind, releasing FROM ip_allocations ORDER BY address")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, bool>(3)?,
        ))
    })?;
    rows.map(|r| {
        let (address, vps_id, kind, releasing) = r?;
        Ok(IpAllocation {
            address: address
                .parse()
                .map_err(|_| StoreError::Malformed(format!("address {address:?}")))?,
            vps_id: vps_id
                .parse()
                .map_err(|_| StoreError::Malformed(format!("vps id {vps_id:?}")))?,
            kind,
            releasing,
        })
    })
    .collect()
}

pub fn ip_owner(conn: &Connection, address: IpAddr) -> Result<Option<Uuid>> {
    let owner: Option<String> = conn
        .query_row(
            "SELECT vps_id FROM ip_allocations WHERE address = ?1",
            [address.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    owner
        .map(|s| {
            s.parse()
                .map_err(|_| StoreError::Malformed(format!("vps id {s:?}")))
        })
        .transpose()
}

pub fn insert_ip(
    conn: &Connection,
    address: IpAddr,
    vps_id: Uuid,
    kind: &str,
    now: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO ip_allocations (address, vps_id, kind, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![address.to_string(), vps_id.to_string(), kind, now],
    )?;
    Ok(())
}

pub fn release_ips(conn: &Connection, vps_id: Uuid) -> Result<()> {
    conn.execute(
        "DELETE FROM ip_allocations WHERE vps_id = ?1",
        [vps_id.to_string()],
    )?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(id: Uuid, mac: &str) -> VmRow {
        VmRow {
            id,
            hostname: "web1".into(),
            template_id: "9010".into(),
            cpu_cores: 2,
            ram_mb: 1024,
            disk_gb: 10,
            bandwidth_mbps: Some(100),
            password_hash: "$6$salt$hash".into(),
            ssh_keys: vec!["ssh-ed25519 AAAA test".into()],
            ip_address: Some("192.0.2.10".parse().unwrap()),
            mac: mac.into(),
            state: VmRowState::Deploying,
            webhook_url: None,
            webhook_secret: None,
            instance_id: "i-1".into(),
            request_digest: "d".into(),
            created_at: "2026-11-23T05:00:00Z".into(),
            updated_at: "2026-11-23T05:00:00Z".into(),
            deployed_at: None,
        }
    }

    #[test]
    fn a_vm_round_trips_through_the_table() {
        let store = super::super::test_store();
        let vm = sample(Uuid::new_v4(), "52:54:00:00:00:01");

        let back = store
            .call_sync(|c| {
                insert(c, &vm)?;
                get(c, vm.id)
            })
            .unwrap();

        assert!(back == Some(vm));
    }

    #[test]
    fn failed_vms_hold_no_allocation() {
        let store = super::super::test_store();
        let a = sample(Uuid::new_v4(), "52:54:00:00:00:01");
        let mut b = sample(Uuid::new_v4(), "52:54:00:00:00:02");
        b.state = VmRowState::Failed;

        let alloc = store
            .call_sync(|c| {
                insert(c, &a)?;
                insert(c, &b)?;
                allocation(c)
            })
            .unwrap();

        assert_eq!(
            alloc,
            Allocation {
                vms: 1,
                cpu_cores: 2,
                ram_mb: 1024,
                disk_gb: 10,
                snapshot_bytes: 0,
            }
        );
    }

    #[test]
    fn deleting_a_vm_releases_its_addresses() {
        let store = super::super::test_store();
        let vm = sample(Uuid::new_v4(), "52:54:00:00:00:01");
        let addr: IpAddr = "192.0.2.10".parse().unwrap();

        let owner = store
            .call_sync(|c| {
                insert(c, &vm)?;
                insert_ip(c, addr, vm.id, "primary", "t")?;
                delete(c, vm.id)?;
                ip_owner(c, addr)
            })
            .unwrap();

        assert_eq!(owner, None);
    }
}

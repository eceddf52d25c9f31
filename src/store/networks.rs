//! Private networks, their members, and per-VM address queries.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{Result, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRow {
    pub id: Uuid,
    pub name: String,
    pub vni: u32,
    pub subnet: IpNetwork,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub id: Uuid,
    pub network_id: Uuid,
    pub vps_id: Uuid,
    pub address: IpAddr,
    pub mac: String,
    /// The VM's NIC index (1-9; 0 is the public NIC).
    pub nic: u8,
    pub created_at: String,
}

fn uuid(s: String) -> Result<Uuid> {
    s.parse()
        .map_err(|_| StoreError::Malformed(format!("uuid {s:?}")))
}

fn parse<T: std::str::FromStr>(s: String, what: &str) -> Result<T> {
    s.parse()
        .map_err(|_| StoreError::Malformed(format!("{what} {s:?}")))
}

pub fn insert_network(conn: &Connection, n: &NetworkRow) -> Result<()> {
    conn.execute(
        "INSERT INTO private_networks (id, name, vni, subnet, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            n.id.to_string(),
            n.name,
            n.vni,
            n.subnet.to_string(),
            n.created_at
        ],
    )?;
    Ok(())
}

pub fn networks(conn: &Connection) -> Result<Vec<NetworkRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, name, vni, subnet, created_at FROM private_networks ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u32>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    rows.map(|r| {
        let (id, name, vni, subnet, created_at) = r?;
        Ok(NetworkRow {
            id: uuid(id)?,
            name,
            vni,
            subnet: parse(subnet, "subnet")?,
            created_at,
        })
    })
    .collect()
}

pub fn network(conn: &Connection, id: Uuid) -> Result<Option<NetworkRow>> {
    Ok(networks(conn)?.into_iter().find(|n| n.id == id))
}

pub fn delete_network(conn: &Connection, id: Uuid) -> Result<()> {
    conn.execute(
        "DELETE FROM private_networks WHERE id = ?1",
        [id.to_string()],
    )?;
    Ok(())
}

const MEMBER_COLUMNS: &str = "id, network_id, vps_id, address, mac, nic, created_at";

/// Members matching `column = value`, or all of them.
fn members_where(conn: &Connection, filter: Option<(&str, String)>) -> Result<Vec<MemberRow>> {
    let (clause, arg) = match filter {
        Some((column, value)) => (format!("{column} = ?1"), value),
        None => ("?1 IS NULL OR 1 = 1".to_owned(), String::new()),
    };
    let sql = format!("SELECT {MEMBER_COLUMNS} FROM memberships WHERE {clause} ORDER BY nic, id");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([arg], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, u8>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    rows.map(|r| {
        let (id, network_id, vps_id, address, mac, nic, created_at) = r?;
        Ok(MemberRow {
            id: uuid(id)?,
            network_id: uuid(network_id)?,
            vps_id: uuid(vps_id)?,
            address: parse(address, "address")?,
            mac,
            nic,
            created_at,
        })
    })
    .collect()
}

pub fn all_members(conn: &Connection) -> Result<Vec<MemberRow>> {
    members_where(conn, None)
}

pub fn members_of_network(conn: &Connection, network: Uuid) -> Result<Vec<MemberRow>> {
    members_where(conn, Some(("network_id", network.to_string())))
}

pub fn members_of_vm(conn: &Connection, vm: Uuid) -> Result<Vec<MemberRow>> {
    members_where(conn, Some(("vps_id", vm.to_string())))
}

pub fn member(conn: &Connection, id: Uuid) -> Result<Option<MemberRow>> {
    Ok(members_where(conn, Some(("id", id.to_string())))?
        .into_iter()
        .next())
}

pub fn insert_member(conn: &Connection, m: &MemberRow) -> Result<()> {
    conn.execute(
        "INSERT INTO memberships (id, network_id, vps_id, address, mac, nic, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            m.id.to_string(),
            m.network_id.to_string(),
            m.vps_id.to_string(),
            m.address.to_string(),
            m.mac,
            m.nic,
            m.created_at
        ],
    )?;
    Ok(())
}

pub fn delete_member(conn: &Connection, id: Uuid) -> Result<()> {
    conn.execute("DELETE FROM memberships WHERE id = ?1", [id.to_string()])?;
    Ok(())
}

pub fn delete_members_of_vm(conn: &Connection, vm: Uuid) -> Result<()> {
    conn.execute(
        "DELETE FROM memberships WHERE vps_id = ?1",
        [vm.to_string()],
    )?;
    Ok(())
}

/// Whether a MAC is used by any VM or membership.
pub fn mac_taken(conn: &Connection, mac: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM vms WHERE mac = ?1 UNION SELECT 1 FROM memberships WHERE mac = ?1",
            [mac],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Moves an address from one VM to another in one statement: there is no moment at which
/// both own it. Returns whether the address belonged to `from`.
/// Marks `vps_id`'s address as being released (see `IpAllocation::releasing`); a no-op
/// when it is no longer the VM's.
pub fn mark_releasing(conn: &Connection, address: IpAddr, vps_id: Uuid) -> Result<()> {
    conn.execute(
        "UPDATE ip_allocations SET releasing = 1 WHERE address = ?1 AND vps_id = ?2",
        params![address.to_string(), vps_id.to_string()],
    )?;
    Ok(())
}

pub fn reassign_ip(conn: &Connection, address: IpAddr, from: Uuid, to: Uuid) -> Result<bool> {
    let n = conn.execute(
        "UPDATE ip_allocations SET vps_id = ?3, releasing = 0 WHERE address = ?1 AND vps_id = ?2",
        params![address.to_string(), from.to_string(), to.to_string()],
    )?;
    Ok(n == 1)
}

pub fn delete_ip(conn: &Connection, address: IpAddr, vps_id: Uuid) -> Result<()> {
    conn.execute(
        "DELETE FROM ip_allocations WHERE address = ?1 AND vps_id = ?2",
        params![address.to_string(), vps_id.to_string()],
    )?;
    Ok(())
}

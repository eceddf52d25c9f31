//! Private networks: customers' isolated L2 segments (the NICs that join VMs to them are
//! `private_nics.rs`).
//!
//! A network is a subnet and a VNI in the store, and on the host a bridge (`hvp<vni>`)
//! with a VXLAN device (`hvx<vni>`) to the other hypervisors. Attaching a VM adds a NIC on
//! that bridge (hot-plugged when the VM runs; no bandwidth limit), an address from the
//! subnet, the NIC's anti-spoofing filter and its cloud-init config; detaching takes all of
//! that away. Attach and detach are tasks on the VM; creating and deleting networks are
//! serialised among themselves.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::net::adapter;
use super::validate::ValidationError;
use super::{VmError, VmManager};
use crate::network::private::{self, AllocError};
use crate::store::{self, MemberRow, NetworkRow};

/// NIC indexes available to private networks (0 is the public NIC).
pub(crate) const MAX_PRIVATE_NICS: u8 = 4;

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateNetworkRequest {
    /// Absent: a new random UUID. Repeating a create with the same id and settings returns
    /// the existing network.
    #[schema(format = Uuid)]
    pub id: Option<String>,
    #[schema(value_type = String, required = true, pattern = "^[A-Za-z0-9 ._-]{1,64}$",
        example = "backend")]
    pub name: Option<String>,
    /// Absent: the next free one of `network.private.vni_first..=vni_last`.
    #[schema(minimum = 1, maximum = 16_777_215)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub vni: Option<i64>,
    /// An IPv4 network address with its prefix (/16 to /29) not overlapping another
    /// network's; absent: the next free one of the node's private pool.
    #[schema(
        example = "10.200.1.0/24",
        pattern = "^[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}$"
    )]
    pub subnet: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct AttachRequest {
    #[schema(value_type = String, format = Uuid, required = true)]
    pub vps_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MemberView {
    pub membership_id: Uuid,
    pub network_id: Uuid,
    pub vps_id: Uuid,
    #[schema(value_type = String, example = "10.200.1.2")]
    pub address: IpAddr,
    pub mac: String,
    pub adapter: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NetworkView {
    pub id: Uuid,
    pub name: String,
    pub vni: u32,
    #[schema(example = "10.200.1.0/24")]
    pub subnet: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NetworkList {
    pub networks: Vec<NetworkView>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SubnetStatus {
    pub pool: String,
    pub prefix_len: u8,
    pub allocated: u64,
    pub free: u64,
    pub subnets: Vec<String>,
}

pub(crate) fn member_view(m: &MemberRow) -> MemberView {
    MemberView {
        membership_id: m.id,
        network_id: m.network_id,
        vps_id: m.vps_id,
        address: m.address,
        mac: m.mac.clone(),
        adapter: adapter(m.nic),
    }
}

fn view(n: &NetworkRow, members: &[MemberRow]) -> NetworkView {
    NetworkView {
        id: n.id,
        name: n.name.clone(),
        vni: n.vni,
        subnet: n.subnet.to_string(),
        created_at: n.created_at.clone(),
        members: members
            .iter()
            .filter(|m| m.network_id == n.id)
            .map(member_view)
            .collect(),
    }
}

pub(crate) fn alloc_err(e: AllocError) -> VmError {
    match e {
        AllocError::NoSubnet { .. } | AllocError::NoVni(..) | AllocError::Full(_) => {
            VmError::PoolExhausted(e.to_string())
        }
        AllocError::Overlap(_) | AllocError::VniInUse(_) => VmError::NetworkExists(e.to_string()),
        other => VmError::Invalid(ValidationError::InvalidResources(other.to_string())),
    }
}

/// Private network names: 1-64 of `[A-Za-z0-9 ._-]`.
pub fn network_name(name: &str) -> Result<(), ValidationError> {
    let ok = (1..=64).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " ._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::InvalidName(format!(
            "network name {:?} must be 1-64 of A-Z, a-z, 0-9, space, '.', '_' and '-'",
            name.chars().take(80).collect::<String>()
        )))
    }
}

impl VmManager {
    pub async fn networks(&self) -> Result<NetworkList, VmError> {
        let (networks, members) = self
            .ctx
            .store
            .call(|c| {
                Ok((
                    store::networks::networks(c)?,
                    store::networks::all_members(c)?,
                ))
            })
            .await?;
        Ok(NetworkList {
            networks: networks.iter().map(|n| view(n, &members)).collect(),
        })
    }

    pub async fn subnets(&self) -> Result<SubnetStatus, VmError> {
        let networks = self
            .ctx
            .store
            .call(|c| store::networks::networks(c))
            .await?;
        let taken: Vec<_> = networks.iter().map(|n| n.subnet).collect();
        let config = &self.ctx.config.network.private;
        let (allocated, free) = private::pool_status(config, &taken);
        Ok(SubnetStatus {
            pool: config.pool.to_string(),
            prefix_len: config.prefix_len,
            allocated,
            free,
            subnets: taken.iter().map(|s| s.to_string()).collect(),
        })
    }

    pub async fn network_create(&self, req: CreateNetworkRequest) -> Result<NetworkView, VmError> {
        let ctx = &self.ctx;
        let name = req
            .name
            .ok_or_else(|| ValidationError::MissingFields(vec!["name"]))?;
        network_name(&name)?;
        let id = match &req.id {
            Some(s) => Uuid::parse_str(s).map_err(|_| {
                VmError::Invalid(ValidationError::InvalidField {
                    field: "id",
                    reason: format!("{s:?} is not a UUID"),
                })
            })?,
            None => Uuid::new_v4(),
        };
        let _admin = ctx.network_admin.lock().await;
        let config = ctx.config.network.private.clone();
        let (requested_vni, requested_subnet) = (req.vni, req.subnet.clone());
        let now = crate::time::now();
        let (row, created) = ctx
            .store
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let existing = store::networks::networks(&tx)?;
                if let Some(n) = existing.iter().find(|n| n.id == id) {
                    let same = n.name == name
                        && requested_vni.is_none_or(|v| v == n.vni as i64)
                        && requested_subnet
                            .as_deref()
                            .is_none_or(|s| s == n.subnet.to_string());
                    return Ok(if same {
                        Ok((n.clone(), false))
                    } else {
                        Err(VmError::InvalidState(format!(
                            "private network {id} exists with other settings"
                        )))
                    });
                }
                let vnis: HashSet<u32> = existing.iter().map(|n| n.vni).collect();
                let subnets: Vec<_> = existing.iter().map(|n| n.subnet).collect();
                let vni = match requested_vni {
                    Some(v) => private::check_vni(&config, v, &vnis),
                    None => private::next_vni(&config, &vnis),
                };
                let subnet = match &requested_subnet {
                    Some(s) => private::check_subnet(s, &subnets),
                    None => private::next_subnet(&config, &subnets),
                };
                let (vni, subnet) = match (vni, subnet) {
                    (Ok(v), Ok(s)) => (v, s),
                    (Err(e), _) | (_, Err(e)) => return Ok(Err(alloc_err(e))),
                };
                let row = NetworkRow {
                    id,
                    name,
                    vni,
                    subnet,
                    created_at: now,
                };
                store::networks::insert_network(&tx, &row)?;
                tx.commit()?;
                Ok(Ok((row, true)))
            })
            .await??;
        if created {
            if let Err(e) = ctx.net.ensure_segment_now(row.vni).await {
                // Nothing half-made: the record goes with the failed segment.
                let id = row.id;
                let _ = ctx.net.remove_segment(row.vni).await;
                ctx.store
                    .call(move |c| store::networks::delete_network(c, id))
                    .await?;
                return Err(VmError::network(e));
            }
            tracing::info!(network = %row.id, vni = row.vni, subnet = %row.subnet, "private network created");
        }
        Ok(view(&row, &[]))
    }

    pub async fn network_delete(&self, id: &str) -> Result<serde_json::Value, VmError> {
        let ctx = &self.ctx;
        let id = Uuid::parse_str(id).map_err(|_| VmError::NetworkNotFound(id.to_owned()))?;
        let _admin = ctx.network_admin.lock().await;
        let row = ctx
            .store
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let Some(row) = store::networks::network(&tx, id)? else {
                    return Ok(Err(VmError::NetworkNotFound(id.to_string())));
                };
                let members = store::networks::members_of_network(&tx, id)?;
                if !members.is_empty() {
                    return Ok(Err(VmError::InvalidState(format!(
                        "private network {id} still has {} member(s); detach them first",
                        members.len()
                    ))));
                }
                store::networks::delete_network(&tx, id)?;
                tx.commit()?;
                Ok(Ok(row))
            })
            .await??;
        ctx.net
            .remove_segment(row.vni)
            .await
            .map_err(VmError::network)?;
        tracing::info!(network = %id, "private network deleted");
        Ok(serde_json::json!({ "deleted": true, "id": id }))
    }
}

//! A VM's NICs as the store knows them, turned into what the host network, libvirt and the
//! guest need: `NicSpec`s for the network manager, `<interface>` elements for the domain,
//! NIC configs for the cloud-init seed, and live changes through the guest agent.

use std::net::IpAddr;
use std::time::Duration;

use uuid::Uuid;

use super::model::PRIMARY_ADAPTER;
use super::{Ctx, Op, VmError};
use crate::cloudinit::NicConfig;
use crate::hypervisor::{guest, HypervisorError};
use crate::network::{self, DesiredNetwork, NicSpec, SegmentSpec};
use crate::store::{self, MemberRow, NetworkRow, VmRow, VmRowState};

/// Everything about one VM's networking.
#[derive(Debug, Clone)]
pub(crate) struct VmNet {
    pub public: NicSpec,
    /// Private NICs with their membership and network.
    pub private: Vec<(MemberRow, NetworkRow, NicSpec)>,
}

impl VmNet {
    pub fn all(&self) -> Vec<NicSpec> {
        std::iter::once(self.public.clone())
            .chain(self.private.iter().map(|(_, _, n)| n.clone()))
            .collect()
    }
}

pub(crate) fn public_nic(ctx: &Ctx, vm: &VmRow, addresses: Vec<IpAddr>) -> NicSpec {
    NicSpec {
        tap: network::tap_name(&ctx.config.network.tap_prefix, vm.id, 0),
        ifb: network::ifb_name(vm.id, 0),
        mac: vm.mac.clone(),
        bridge: ctx.config.network.bridge.clone(),
        addresses,
        bandwidth_mbps: vm.bandwidth_mbps,
    }
}

pub(crate) fn private_nic(prefix: &str, vm: Uuid, m: &MemberRow, n: &NetworkRow) -> NicSpec {
    NicSpec {
        tap: network::tap_name(prefix, vm, m.nic),
        ifb: network::ifb_name(vm, m.nic),
        mac: m.mac.clone(),
        bridge: network::private_bridge(n.vni),
        addresses: vec![m.address],
        bandwidth_mbps: None,
    }
}

/// The VM's NICs from the store.
pub(crate) async fn load(ctx: &Ctx, vm: &VmRow) -> Result<VmNet, VmError> {
    let id = vm.id;
    let (ips, members, networks) = ctx
        .store
        .call(move |c| {
            Ok((
                store::vms::ip_allocations(c)?
                    .into_iter()
                    .filter(|a| a.vps_id == id && a.usable())
                    .collect::<Vec<_>>(),
                store::networks::members_of_vm(c, id)?,
                store::networks::networks(c)?,
            ))
        })
        .await?;
    let mut addresses: Vec<IpAddr> = ips.iter().map(|a| a.address).collect();
    // The primary first, then the rest in a stable order.
    addresses.sort_by_key(|a| (Some(*a) != vm.ip_address, *a));
    let private = members
        .into_iter()
        .filter_map(|m| {
            let n = networks.iter().find(|n| n.id == m.network_id)?.clone();
            let spec = private_nic(&ctx.config.network.tap_prefix, id, &m, &n);
            Some((m, n, spec))
        })
        .collect();
    Ok(VmNet {
        public: public_nic(ctx, vm, addresses),
        private,
    })
}

/// What the whole host should hold, without the VMs in `exclude`.
pub(crate) async fn desired(ctx: &Ctx, exclude: &[Uuid]) -> Result<DesiredNetwork, VmError> {
    let (vms, ips, members, networks) = ctx
        .store
        .call(|c| {
            Ok((
                store::vms::list(c)?,
                store::vms::ip_allocations(c)?,
                store::networks::all_members(c)?,
                store::networks::networks(c)?,
            ))
        })
        .await?;
    let mut out = DesiredNetwork {
        nics: Vec::new(),
        segments: networks
            .iter()
            .map(|n| SegmentSpec { vni: n.vni })
            .collect(),
    };
    for vm in vms
        .iter()
        .filter(|v| v.state != VmRowState::Failed && !exclude.contains(&v.id))
    {
        let addresses = ips
            .iter()
            .filter(|a| a.vps_id == vm.id && a.usable())
            .map(|a| a.address)
            .collect();
        out.nics.push(public_nic(ctx, vm, addresses));
        for m in members.iter().filter(|m| m.vps_id == vm.id) {
            if let Some(n) = networks.iter().find(|n| n.id == m.network_id) {
                out.nics
                    .push(private_nic(&ctx.config.network.tap_prefix, vm.id, m, n));
            }
        }
    }
    Ok(out)
}

fn net_err(op: Op) -> impl Fn(network::NetworkError) -> VmError {
    move |e| VmError::host(op, "the VM's network devices could not be configured", e)
}

/// Rebuilds the anti-spoofing table from the store (without the VMs in `exclude`).
pub(crate) async fn refresh_filters(ctx: &Ctx, exclude: &[Uuid], op: Op) -> Result<(), VmError> {
    let _serial = ctx.filter_lock.lock().await;
    let desired = desired(ctx, exclude).await?;
    ctx.net.apply_filters(&desired).await.map_err(net_err(op))?;
    Ok(())
}

/// Puts a VM's NICs on their bridges with their limits (after every start: the taps are
/// new) and makes sure its segments exist.
pub(crate) async fn plug(ctx: &Ctx, vm: &VmRow, op: Op) -> Result<(), VmError> {
    let net = load(ctx, vm).await?;
    let desired = DesiredNetwork {
        nics: net.all(),
        segments: net
            .private
            .iter()
            .map(|(_, n, _)| SegmentSpec { vni: n.vni })
            .collect(),
    };
    ctx.net.attach(&desired).await.map_err(net_err(op))?;
    Ok(())
}

/// Updates the allowed addresses of a VM's public NIC in place, rebuilding the whole table
/// if it is not there (a host that lost its rules).
pub(crate) async fn update_filter(ctx: &Ctx, vm: &VmRow, op: Op) -> Result<(), VmError> {
    let updated = {
        let _serial = ctx.filter_lock.lock().await;
        let net = load(ctx, vm).await?;
        ctx.net.update_addresses(&net.public).await
    };
    if updated.is_err() {
        refresh_filters(ctx, &[], op).await?;
    }
    Ok(())
}

/// Makes the whole host network match the store (startup, after a host reboot).
pub(crate) async fn reconcile(ctx: &Ctx) -> Result<network::Applied, VmError> {
    let _serial = ctx.filter_lock.lock().await;
    // A VM whose delete is under way (resumed after a restart) keeps its record until the
    // delete's last step; what its `remove_network` step took down must stay down.
    let deleting: Vec<Uuid> = ctx
        .store
        .call(|c| store::vms::list(c))
        .await?
        .into_iter()
        .map(|vm| vm.id)
        .filter(|id| {
            ctx.engine
                .holder(*id)
                .is_some_and(|h| h.kind == super::TaskKind::Delete.as_str())
        })
        .collect();
    let desired = desired(ctx, &deleting).await?;
    ctx.net.apply(&desired).await.map_err(net_err(Op::Network))
}

/// The guest's NICs for its cloud-init network config.
pub(crate) fn seed_nics(ctx: &Ctx, net: &VmNet) -> Vec<NicConfig> {
    let pool = ctx.pool.config();
    let pool6 = ctx.config.network.pool6.as_ref();
    let prefix_of = |a: &IpAddr| match a {
        IpAddr::V4(_) => pool.cidr.prefix(),
        IpAddr::V6(_) => pool6.map(|p| p.cidr.prefix()).unwrap_or(64),
    };
    let mut dns = pool.dns.clone();
    if let Some(p6) = pool6 {
        dns.extend(p6.dns.iter().copied());
    }
    let mut nics = vec![NicConfig {
        name: PRIMARY_ADAPTER.into(),
        mac: net.public.mac.clone(),
        addresses: net
            .public
            .addresses
            .iter()
            .map(|a| format!("{a}/{}", prefix_of(a)))
            .collect(),
        gateway4: Some(pool.gateway).filter(|g| g.is_ipv4()),
        gateway6: pool6.map(|p| p.gateway),
        dns,
        mtu: None,
    }];
    for (m, n, _) in &net.private {
        nics.push(NicConfig {
            name: adapter(m.nic),
            mac: m.mac.clone(),
            addresses: vec![format!("{}/{}", m.address, n.subnet.prefix())],
            gateway4: None,
            gateway6: None,
            dns: Vec::new(),
            mtu: Some(ctx.config.network.private.mtu),
        });
    }
    nics
}

/// The guest's name for NIC `n`.
pub(crate) fn adapter(n: u8) -> String {
    format!("eth{n}")
}

/// Runs a shell script in the guest through its agent. `Ok(None)` when the guest agent does
/// not answer (the change then applies at the next boot from the seed).
pub(crate) async fn guest_script(
    ctx: &Ctx,
    id: Uuid,
    script: &str,
) -> Result<Option<i64>, VmError> {
    let exit = guest::run_script(ctx.hv.as_ref(), id, script, Duration::from_secs(30)).await;
    match exit {
        Ok(Some(exit)) => {
            if exit.code != 0 {
                // The guest wrote it: bounded, and logged escaped (a newline must not
                // forge a log line).
                let err = truncate(exit.stderr.trim(), GUEST_OUTPUT_LOGGED);
                tracing::warn!(vps = %id, code = exit.code, stderr = ?err, "guest script failed");
            }
            Ok(Some(exit.code))
        }
        Ok(None)
        | Err(HypervisorError::AgentUnavailable { .. })
        | Err(HypervisorError::NoDomain(_)) => Ok(None),
        Err(e) => Err(VmError::hypervisor(Op::Status, e)),
    }
}

/// How much of what a guest wrote the log keeps.
const GUEST_OUTPUT_LOGGED: usize = 512;

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A shell word for a value we generated (addresses, MACs, names): checked, not escaped.
pub(crate) fn shell_safe(s: &str) -> Result<&str, VmError> {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:/-_".contains(&b))
    {
        Ok(s)
    } else {
        Err(VmError::Internal(format!(
            "refusing to pass {s:?} to a guest shell"
        )))
    }
}

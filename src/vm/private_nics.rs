//! A VM's NICs on private networks: attach and detach, each a task on the VM. Attaching
//! adds a NIC on the network's bridge (hot-plugged when the VM runs; no bandwidth limit),
//! an address from the subnet, the NIC's anti-spoofing filter and its cloud-init config;
//! detaching takes all of that away.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::domain::{define, write_seed};
use super::net::{self, adapter, guest_script, shell_safe};
use super::private_nets::{alloc_err, member_view, AttachRequest, MemberView, MAX_PRIVATE_NICS};
use super::validate::ValidationError;
use super::{Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::network::private;
use crate::store::{self, MemberRow, NetworkRow, NewTask};
use crate::tasks::{Operation, StepCtx};

impl VmManager {
    pub async fn network_attach(
        &self,
        network_id: &str,
        req: AttachRequest,
    ) -> Result<MemberView, VmError> {
        let ctx = &self.ctx;
        let network_id = Uuid::parse_str(network_id)
            .map_err(|_| VmError::NetworkNotFound(network_id.to_owned()))?;
        let vps = req
            .vps_id
            .ok_or_else(|| ValidationError::MissingFields(vec!["vps_id"]))?;
        let vps_id = Uuid::parse_str(&vps).map_err(|_| VmError::NotFound(Uuid::nil()))?;
        let vm = ctx.vm(vps_id).await?;
        ctx.admit_recorded(TaskKind::NetAttach, &vm)?;
        let claim = ctx.claim(vps_id, TaskKind::NetAttach)?;
        let task_id = claim.task();
        let now = crate::time::now();
        let member_id = Uuid::new_v4();
        let member = ctx
            .store
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let Some(network) = store::networks::network(&tx, network_id)? else {
                    return Ok(Err(VmError::NetworkNotFound(network_id.to_string())));
                };
                let members = store::networks::members_of_network(&tx, network_id)?;
                if let Some(m) = members.iter().find(|m| m.vps_id == vps_id) {
                    // Already a member: the same answer again.
                    return Ok(Ok((m.clone(), false)));
                }
                let mine = store::networks::members_of_vm(&tx, vps_id)?;
                let Some(nic) = (1..=MAX_PRIVATE_NICS).find(|n| !mine.iter().any(|m| m.nic == *n))
                else {
                    return Ok(Err(VmError::InvalidState(format!(
                        "the VPS is already on {MAX_PRIVATE_NICS} private networks"
                    ))));
                };
                let taken: HashSet<IpAddr> = members.iter().map(|m| m.address).collect();
                let address = match private::next_member_address(network.subnet, &taken) {
                    Ok(a) => a,
                    Err(e) => return Ok(Err(alloc_err(e))),
                };
                let mut mac = crate::network::random_mac();
                while store::networks::mac_taken(&tx, &mac)? {
                    mac = crate::network::random_mac();
                }
                let m = MemberRow {
                    id: member_id,
                    network_id,
                    vps_id,
                    address,
                    mac,
                    nic,
                    created_at: now.clone(),
                };
                store::networks::insert_member(&tx, &m)?;
                store::tasks::insert(
                    &tx,
                    &NewTask {
                        id: task_id,
                        kind: TaskKind::NetAttach.as_str(),
                        vps_id,
                        input: serde_json::json!({ "membership_id": member_id }),
                        steps: &crate::tasks::step_names(ATTACH_STEPS),
                        now: &now,
                    },
                )?;
                tx.commit()?;
                Ok(Ok((m, true)))
            })
            .await??;
        let (member, fresh) = member;
        if !fresh {
            return Ok(member_view(&member));
        }
        tracing::info!(vps = %vps_id, network = %network_id, address = %member.address, "attach");
        let op = NicOp {
            ctx: self.ctx.clone(),
            member: member.clone(),
            attach: true,
        };
        ctx.engine
            .run(claim, TaskKind::NetAttach.as_str(), op)
            .await?;
        Ok(member_view(&member))
    }

    pub async fn network_detach(
        &self,
        network_id: &str,
        membership_id: &str,
    ) -> Result<serde_json::Value, VmError> {
        let ctx = &self.ctx;
        let network_id = Uuid::parse_str(network_id)
            .map_err(|_| VmError::NetworkNotFound(network_id.to_owned()))?;
        let not_found = || VmError::NetworkNotFound(format!("membership {membership_id}"));
        let member_id = Uuid::parse_str(membership_id).map_err(|_| not_found())?;
        let member = ctx
            .store
            .call(move |c| store::networks::member(c, member_id))
            .await?
            .filter(|m| m.network_id == network_id)
            .ok_or_else(not_found)?;
        let claim = ctx.claim(member.vps_id, TaskKind::NetDetach)?;
        ctx.record_task(
            &claim,
            TaskKind::NetDetach,
            DETACH_STEPS,
            serde_json::json!({ "membership_id": member_id }),
        )
        .await?;
        tracing::info!(vps = %member.vps_id, network = %network_id, "detach");
        let op = NicOp {
            ctx: self.ctx.clone(),
            member,
            attach: false,
        };
        ctx.engine
            .run(claim, TaskKind::NetDetach.as_str(), op)
            .await?;
        Ok(serde_json::json!({ "deleted": true, "membership_id": member_id }))
    }
}

crate::step_family! {
    /// A step of an attach or a detach.
    pub(crate) enum NicStep {
        /// Joining a private network: the segment exists, the filter knows the NIC before
        /// it is plugged, then the guest configures it.
        Attach(AttachStep) in ATTACH_STEPS {
            EnsureSegment = "ensure_segment",
            UpdateFilter = "update_filter",
            PlugNic = "plug_nic",
            UpdateGuest = "update_guest",
        },
        /// Leaving one: the guest lets go of the NIC before it is unplugged and forgotten.
        Detach(DetachStep) in DETACH_STEPS {
            UpdateGuest = "update_guest",
            UnplugNic = "unplug_nic",
            ReleaseMember = "release_member",
            UpdateFilter = "update_filter",
        },
    }
}

pub(crate) struct NicOp {
    ctx: Arc<Ctx>,
    member: MemberRow,
    attach: bool,
}

/// A private-network task interrupted by an agent restart, rebuilt from its journal
/// (`{membership_id}`). `Ok(None)`: a detach that had already released the membership,
/// whose remaining step (the filters) the startup reconciliation does from the store.
pub(crate) async fn resume(ctx: &Arc<Ctx>, kind: TaskKind, task: &store::TaskRow) -> Resume {
    let member_id: Option<Uuid> = task.input["membership_id"]
        .as_str()
        .and_then(|m| m.parse().ok());
    let Some(member_id) = member_id else {
        return Resume::Unreadable("no membership_id in the task's input".into());
    };
    let attach = match kind {
        TaskKind::NetAttach => true,
        TaskKind::NetDetach => false,
        other => return Resume::Unreadable(format!("{other} is not a private-network task")),
    };
    let member = ctx
        .store
        .call(move |c| store::networks::member(c, member_id))
        .await;
    match member {
        Ok(Some(member)) => Resume::run(
            ctx,
            kind,
            NicOp {
                ctx: ctx.clone(),
                member,
                attach,
            },
        ),
        Ok(None) if !attach => Resume::Done,
        Ok(None) => Resume::Unreadable(format!("membership {member_id} of the attach is gone")),
        Err(e) => Resume::Unreadable(e.to_string()),
    }
}

impl NicOp {
    fn nic_xml(&self, vni: u32) -> String {
        use super::domain_xml::escape;
        format!(
            "<interface type='bridge'><mac address='{}'/><source bridge='{}'/>\
             <target dev='{}'/><model type='virtio'/></interface>",
            escape(&self.member.mac),
            escape(&crate::network::private_bridge(vni)),
            escape(&crate::network::tap_name(
                &self.ctx.config.network.tap_prefix,
                self.member.vps_id,
                self.member.nic
            )),
        )
    }

    async fn network(&self) -> Result<NetworkRow, VmError> {
        let id = self.member.network_id;
        self.ctx
            .store
            .call(move |c| store::networks::network(c, id))
            .await?
            .ok_or_else(|| VmError::NetworkNotFound(id.to_string()))
    }

    async fn running(&self) -> Result<bool, VmError> {
        Ok(matches!(
            self.ctx
                .hv
                .power_state(self.member.vps_id)
                .await
                .map_err(|e| VmError::hypervisor(Op::Network, e))?,
            Some(crate::hypervisor::PowerState::Running | crate::hypervisor::PowerState::Paused)
        ))
    }

    /// Whether the running domain has the NIC (by MAC).
    async fn plugged(&self) -> Result<bool, VmError> {
        let xml = self
            .ctx
            .hv
            .domain_xml(self.member.vps_id)
            .await
            .map_err(|e| VmError::hypervisor(Op::Network, e))?;
        Ok(xml.contains(&format!("<mac address='{}'/>", self.member.mac)))
    }

    fn net_err(e: crate::network::NetworkError) -> VmError {
        VmError::network(e)
    }

    async fn step(&self, step: NicStep) -> Result<(), VmError> {
        use NicStep::{Attach, Detach};
        let ctx = &self.ctx;
        let vm_id = self.member.vps_id;
        match step {
            Attach(AttachStep::EnsureSegment) => {
                let n = self.network().await?;
                ctx.net
                    .ensure_segment_now(n.vni)
                    .await
                    .map_err(Self::net_err)
            }
            Attach(AttachStep::UpdateFilter) | Detach(DetachStep::UpdateFilter) => {
                net::refresh_filters(ctx, &[], Op::Network).await
            }
            Attach(AttachStep::PlugNic) => {
                let vm = ctx.vm(vm_id).await?;
                define(ctx, &vm, Op::Network).await?;
                if self.running().await? && !self.plugged().await? {
                    let n = self.network().await?;
                    ctx.hv
                        .attach_device_live(vm_id, self.nic_xml(n.vni))
                        .await
                        .map_err(|e| VmError::hypervisor(Op::Network, e))?;
                }
                if self.running().await? {
                    net::plug(ctx, &vm, Op::Network).await?;
                }
                Ok(())
            }
            Attach(AttachStep::UpdateGuest) => {
                let vm = ctx.vm(vm_id).await?;
                write_seed(ctx, &vm).await?;
                if self.running().await? {
                    let n = self.network().await?;
                    self.guest_configure(n.subnet.prefix(), ctx.config.network.private.mtu)
                        .await?;
                }
                Ok(())
            }
            Detach(DetachStep::UpdateGuest) => {
                let dev = adapter(self.member.nic);
                let script = format!(
                    "ip addr flush dev {dev} 2>/dev/null; ip link set {dev} down 2>/dev/null; true"
                );
                if self.running().await? {
                    guest_script(ctx, vm_id, &script).await?;
                }
                Ok(())
            }
            Detach(DetachStep::UnplugNic) => {
                if self.running().await? && self.plugged().await? {
                    let n = self.network().await?;
                    ctx.hv
                        .detach_device_live(vm_id, self.nic_xml(n.vni))
                        .await
                        .map_err(|e| VmError::hypervisor(Op::Network, e))?;
                    // libvirt returns once the removal was *requested*; the guest decides
                    // when (and whether) it lets go. Until the NIC is gone from the live
                    // domain, its membership and filter must stay.
                    let timeout = Duration::from_secs(ctx.config.network.unplug_timeout_s);
                    let deadline = tokio::time::Instant::now() + timeout;
                    while self.running().await? && self.plugged().await? {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(VmError::Failed {
                                op: Op::Network,
                                message: format!(
                                    "the guest did not release its private NIC within {} s \
                                     (network.unplug_timeout_s); the membership stays, try \
                                     again",
                                    timeout.as_secs()
                                ),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                Ok(())
            }
            Detach(DetachStep::ReleaseMember) => {
                let id = self.member.id;
                ctx.store
                    .call(move |c| store::networks::delete_member(c, id))
                    .await?;
                let vm = ctx.vm(vm_id).await?;
                define(ctx, &vm, Op::Network).await?;
                write_seed(ctx, &vm).await?;
                let nic = net::private_nic(
                    &ctx.config.network.tap_prefix,
                    vm_id,
                    &self.member,
                    &self.network().await?,
                );
                ctx.net.remove_nic(&nic).await.map_err(Self::net_err)
            }
        }
    }

    /// Names the hot-plugged NIC as the seed will (`ethN`) and gives it its address.
    async fn guest_configure(&self, prefix: u8, mtu: u32) -> Result<(), VmError> {
        let (mac, dev) = (self.member.mac.to_lowercase(), adapter(self.member.nic));
        let addr = self.member.address.to_string();
        let (mac, dev, addr) = (shell_safe(&mac)?, shell_safe(&dev)?, shell_safe(&addr)?);
        // udev renames a new NIC shortly after it appears: let it finish first.
        let script = format!(
            "for i in $(seq 40); do \
               udevadm settle -t 5 2>/dev/null; \
               cur=$(ip -o link | awk -v m={mac} 'tolower($0) ~ m {{sub(/:$/, \"\", $2); print $2; exit}}'); \
               [ -n \"$cur\" ] && break; sleep 0.25; done; \
             udevadm settle -t 5 2>/dev/null; \
             cur=$(ip -o link | awk -v m={mac} 'tolower($0) ~ m {{sub(/:$/, \"\", $2); print $2; exit}}'); \
             [ -n \"$cur\" ] || exit 3; \
             if [ \"$cur\" != {dev} ]; then ip link set dev \"$cur\" down; ip link set dev \"$cur\" name {dev}; fi; \
             ip link set dev {dev} mtu {mtu}; \
             ip addr replace {addr}/{prefix} dev {dev}; ip link set dev {dev} up"
        );
        guest_script(&self.ctx, self.member.vps_id, &script).await?;
        Ok(())
    }

    async fn undo(&self, step: NicStep) -> Result<(), VmError> {
        let ctx = &self.ctx;
        match step {
            // Attaching failed: the membership and everything made for it go.
            NicStep::Attach(AttachStep::EnsureSegment) => {
                let id = self.member.id;
                ctx.store
                    .call(move |c| store::networks::delete_member(c, id))
                    .await?;
                net::refresh_filters(ctx, &[], Op::Network).await
            }
            NicStep::Attach(AttachStep::PlugNic) => {
                if self.running().await? && self.plugged().await? {
                    let n = self.network().await?;
                    let _ = ctx
                        .hv
                        .detach_device_live(self.member.vps_id, self.nic_xml(n.vni))
                        .await;
                }
                Ok(())
            }
            // The filter and the guest follow the store, which the segment's undo (the
            // membership's removal) restored.
            NicStep::Attach(AttachStep::UpdateFilter | AttachStep::UpdateGuest) => Ok(()),
            // A detach goes forward, never back (`rolls_back`).
            NicStep::Detach(_) => Ok(()),
        }
    }
}

impl Operation for NicOp {
    type Error = VmError;
    type Step = NicStep;

    fn steps(&self) -> &'static [Self::Step] {
        if self.attach {
            ATTACH_STEPS
        } else {
            DETACH_STEPS
        }
    }

    fn rolls_back(&self) -> bool {
        self.attach
    }

    async fn run_step(&self, step: NicStep, _ctx: &StepCtx) -> Result<(), VmError> {
        self.step(step).await
    }

    async fn undo_step(&self, step: NicStep) -> Result<(), VmError> {
        self.undo(step).await?;
        if step == NicStep::Attach(AttachStep::EnsureSegment) {
            // After the membership is gone, the definition and seed follow.
            let vm = self.ctx.vm(self.member.vps_id).await?;
            define(&self.ctx, &vm, Op::Network).await?;
            write_seed(&self.ctx, &vm).await?;
        }
        Ok(())
    }
}

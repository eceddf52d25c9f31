//! Extra IP addresses: add, remove, move between VMs.
//!
//! Each change is a task on the VM (both VMs, for a move). The store is the truth: an
//! address is taken in the same transaction that records the task, and a move is one
//! `UPDATE` of its owner, so at no moment do two VMs own it. Then the host follows (the
//! anti-spoofing sets) and the guest follows: its cloud-init network config is rewritten
//! (applied at every boot), and when its agent answers the address is added or removed
//! live, with a gratuitous ARP.
//!
//! Taking an address away runs in the other order, because the guest decides how long its
//! part takes (a stalled agent holds a step for tens of seconds): the address is first
//! marked `releasing` (still held, so nobody else can be given it, but no longer in the
//! VM's filter or seed), then the VM's filter lets go of it, then the guest, and only then
//! is it freed (remove) or given to its new owner (move). At no moment can a VM send from
//! an address that another VM holds.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::domain::write_seed;
use super::model::{IpKind, PRIMARY_ADAPTER};
use super::net::{self, guest_script, shell_safe};
use super::validate::ValidationError;
use super::{Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::network::ipam::{IpamError, Pool};
use crate::store::{self, NewTask, VmRow};
use crate::tasks::{Claim, Operation, StepCtx};

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct AddIpRequest {
    /// The address to add (`ip` is accepted as a synonym); absent: the pool's next free one.
    #[serde(alias = "ip")]
    #[schema(example = "203.0.113.20")]
    pub address: Option<String>,
    /// `ipv4` (default) or `ipv6`, when no address is given.
    #[schema(value_type = Option<IpFamily>)]
    pub family: Option<String>,
}

// The request keeps `family` as text, so that an unknown family is refused as that
// field's error rather than as unreadable JSON; this enum only describes it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct MoveIpRequest {
    #[schema(value_type = String, format = Uuid, required = true)]
    pub target_vps_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpEntry {
    #[schema(value_type = String, example = "203.0.113.10")]
    pub address: IpAddr,
    #[serde(rename = "type")]
    pub kind: IpKind,
    pub adapter: String,
    pub mac: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpLimits {
    pub max_extra_ips: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpList {
    pub ips: Vec<IpEntry>,
    pub limits: IpLimits,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpAdded {
    #[schema(value_type = String, example = "203.0.113.20")]
    pub address: IpAddr,
    pub adapter: String,
    #[serde(rename = "type")]
    pub kind: IpKind,
    /// Whether the guest agent applied it at once (else at the next boot).
    pub applied_live: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpMoved {
    #[schema(value_type = String, example = "203.0.113.20")]
    pub address: IpAddr,
    pub from_vps_id: Uuid,
    pub to_vps_id: Uuid,
}

crate::step_family! {
    /// A step of one of the three address tasks.
    pub(crate) enum IpStep {
        /// Adding an address: it is the VM's once allocated, then filtered, then in the
        /// guest.
        Add(AddStep) in ADD_STEPS {
            AllocateIp = "allocate_ip",
            UpdateFilter = "update_filter",
            UpdateGuest = "update_guest",
        },
        /// Removing an address: held (never handed out) until the filter and the guest let
        /// go.
        Remove(RemoveStep) in REMOVE_STEPS {
            MarkReleasing = "mark_releasing",
            UpdateFilter = "update_filter",
            UpdateGuest = "update_guest",
            ForgetNeighbour = "forget_neighbour",
            ReleaseIp = "release_ip",
        },
        /// Moving an address: out of the source's filter and guest before the target gets
        /// it.
        Move(MoveStep) in MOVE_STEPS {
            MarkReleasing = "mark_releasing",
            UpdateSourceFilter = "update_source_filter",
            RemoveFromSource = "remove_from_source",
            Reassign = "reassign",
            UpdateTargetFilter = "update_target_filter",
            ForgetNeighbour = "forget_neighbour",
            AddToTarget = "add_to_target",
        },
    }
}

fn parse_address(s: &str) -> Result<IpAddr, VmError> {
    s.parse().map_err(|_| {
        VmError::Invalid(ValidationError::InvalidField {
            field: "address",
            reason: format!("{s:?} is not an IP address"),
        })
    })
}

impl VmManager {
    pub async fn ips(&self, id: Uuid) -> Result<IpList, VmError> {
        let vm = self.ctx.vm(id).await?;
        let allocations = self
            .ctx
            .store
            .call(move |c| store::vms::ip_allocations(c))
            .await?;
        let mut ips: Vec<IpEntry> = allocations
            .into_iter()
            .filter(|a| a.vps_id == id)
            .map(|a| IpEntry {
                address: a.address,
                kind: IpKind::from_store(&a.kind),
                adapter: PRIMARY_ADAPTER.into(),
                mac: vm.mac.clone(),
            })
            .collect();
        ips.sort_by_key(|e| (e.kind, e.address));
        Ok(IpList {
            ips,
            limits: IpLimits {
                max_extra_ips: self.ctx.config.network.max_extra_ips,
            },
        })
    }

    pub async fn add_ip(&self, id: Uuid, req: AddIpRequest) -> Result<IpAdded, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        ctx.admit_recorded(TaskKind::IpAdd, &vm)?;
        let requested = req.address.as_deref().map(parse_address).transpose()?;
        let want_v6 = match (requested, req.family.as_deref()) {
            (Some(a), _) => a.is_ipv6(),
            (None, None | Some("ipv4")) => false,
            (None, Some("ipv6")) => true,
            (None, Some(other)) => {
                return Err(VmError::Invalid(ValidationError::InvalidField {
                    field: "family",
                    reason: format!("{other:?} must be ipv4 or ipv6"),
                }))
            }
        };
        let pool = if want_v6 {
            match &ctx.config.network.pool6 {
                Some(p) => Pool::new(p.clone()),
                None => {
                    return Err(VmError::Invalid(ValidationError::InvalidResources(
                        "this node has no IPv6 pool (network.pool6)".into(),
                    )))
                }
            }
        } else {
            ctx.pool.clone()
        };
        let claim = ctx.claim(id, TaskKind::IpAdd)?;
        let max = ctx.config.network.max_extra_ips;
        let task_id = claim.task();
        let now = crate::time::now();
        let address = ctx
            .store
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let all = store::vms::ip_allocations(&tx)?;
                let extras = all
                    .iter()
                    .filter(|a| a.vps_id == id && a.kind == IpKind::Extra.as_str())
                    .count();
                if extras >= max {
                    return Ok(Err(VmError::InvalidState(format!(
                        "the VPS already holds {max} extra addresses (network.max_extra_ips)"
                    ))));
                }
                let taken: HashSet<IpAddr> = all.iter().map(|a| a.address).collect();
                let address = match pool.choose(requested, &taken) {
                    Ok(a) => a,
                    Err(e) => return Ok(Err(VmError::Ip(e))),
                };
                store::vms::insert_ip(&tx, address, id, IpKind::Extra.as_str(), &now)?;
                store::tasks::insert(
                    &tx,
                    &NewTask {
                        id: task_id,
                        kind: TaskKind::IpAdd.as_str(),
                        vps_id: id,
                        input: serde_json::json!({ "address": address }),
                        steps: &crate::tasks::step_names(ADD_STEPS),
                        now: &now,
                    },
                )?;
                tx.commit()?;
                Ok(Ok(address))
            })
            .await??;
        tracing::info!(vps = %id, %address, "add extra address");
        let op = IpOp {
            ctx: self.ctx.clone(),
            vm: id,
            target: None,
            address,
            kind: IpOpKind::Add,
            live: std::sync::atomic::AtomicBool::new(false),
            _target_claim: None,
        };
        let op = Arc::new(op);
        ctx.engine
            .run(claim, TaskKind::IpAdd.as_str(), SharedIpOp(op.clone()))
            .await?;
        Ok(IpAdded {
            address,
            adapter: PRIMARY_ADAPTER.into(),
            kind: IpKind::Extra,
            applied_live: op.live.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    pub async fn remove_ip(&self, id: Uuid, address: &str) -> Result<(), VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        let address = self.owned_address(&vm, address).await?;
        let claim = ctx.claim(id, TaskKind::IpRemove)?;
        ctx.record_task(
            &claim,
            TaskKind::IpRemove,
            REMOVE_STEPS,
            serde_json::json!({ "address": address }),
        )
        .await?;
        tracing::info!(vps = %id, %address, "remove extra address");
        let op = IpOp {
            ctx: self.ctx.clone(),
            vm: id,
            target: None,
            address,
            kind: IpOpKind::Remove,
            live: Default::default(),
            _target_claim: None,
        };
        ctx.engine
            .run(claim, TaskKind::IpRemove.as_str(), SharedIpOp(Arc::new(op)))
            .await
    }

    pub async fn move_ip(
        &self,
        id: Uuid,
        address: &str,
        req: MoveIpRequest,
    ) -> Result<IpMoved, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        let target_id = req
            .target_vps_id
            .ok_or_else(|| ValidationError::MissingFields(vec!["target_vps_id"]))?;
        let target_id = Uuid::parse_str(&target_id).map_err(|_| {
            VmError::Invalid(ValidationError::InvalidField {
                field: "target_vps_id",
                reason: format!("{target_id:?} is not a UUID"),
            })
        })?;
        let address = self.owned_address(&vm, address).await?;
        if target_id == id {
            return Err(VmError::InvalidState(
                "the address already belongs to that VPS".into(),
            ));
        }
        let target = ctx.vm(target_id).await?;
        ctx.admit_recorded(TaskKind::IpMove, &target)?;
        let max = ctx.config.network.max_extra_ips;
        let extras = ctx
            .store
            .call(move |c| store::vms::ip_allocations(c))
            .await?
            .into_iter()
            .filter(|a| a.vps_id == target_id && a.kind == IpKind::Extra.as_str())
            .count();
        if extras >= max {
            return Err(VmError::InvalidState(format!(
                "the target VPS already holds {max} extra addresses"
            )));
        }
        let claim = ctx.claim(id, TaskKind::IpMove)?;
        let target_claim: Claim = ctx
            .engine
            .claim(target_id, claim.task(), TaskKind::IpMove.as_str())
            .map_err(|busy| VmError::TaskInProgress {
                vm: target_id,
                task: busy.task,
            })?;
        ctx.record_task(
            &claim,
            TaskKind::IpMove,
            MOVE_STEPS,
            serde_json::json!({ "address": address, "target_vps_id": target_id }),
        )
        .await?;
        tracing::info!(from = %id, to = %target_id, %address, "move address");
        let op = IpOp {
            ctx: self.ctx.clone(),
            vm: id,
            target: Some(target_id),
            address,
            kind: IpOpKind::Move,
            live: Default::default(),
            _target_claim: Some(target_claim),
        };
        ctx.engine
            .run(claim, TaskKind::IpMove.as_str(), SharedIpOp(Arc::new(op)))
            .await?;
        Ok(IpMoved {
            address,
            from_vps_id: id,
            to_vps_id: target_id,
        })
    }

    /// `address` if it is one of `vm`'s extra addresses: `IP_NOT_FOUND` if not its own,
    /// `PRIMARY_IP` for its primary.
    async fn owned_address(&self, vm: &VmRow, address: &str) -> Result<IpAddr, VmError> {
        let not_found = || VmError::IpNotFound(address.to_owned());
        let addr: IpAddr = address.parse().map_err(|_| not_found())?;
        let id = vm.id;
        let owned = self
            .ctx
            .store
            .call(move |c| store::vms::ip_allocations(c))
            .await?
            .into_iter()
            .find(|a| a.address == addr && a.vps_id == id)
            .ok_or_else(not_found)?;
        if owned.kind == IpKind::Primary.as_str() {
            return Err(VmError::PrimaryIp(addr));
        }
        Ok(addr)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IpOpKind {
    Add,
    Remove,
    Move,
}

struct IpOp {
    ctx: Arc<Ctx>,
    vm: Uuid,
    target: Option<Uuid>,
    address: IpAddr,
    kind: IpOpKind,
    live: std::sync::atomic::AtomicBool,
    /// Held for the whole move, so nothing else changes the target meanwhile.
    _target_claim: Option<Claim>,
}

/// The operation behind an `Arc`, so the caller can read what it recorded.
pub(crate) struct SharedIpOp(Arc<IpOp>);

/// An address task interrupted by an agent restart, rebuilt from its journal: `ip_add`
/// and `ip_remove` carry `{address}`, `ip_move` also `{target_vps_id}` (whose claim the
/// caller took for the same task). Every step can be repeated, so the task continues (an
/// add that had failed finishes its unwinding).
pub(crate) fn resume(ctx: &Arc<Ctx>, kind: TaskKind, task: &store::TaskRow) -> Resume {
    let address: Option<IpAddr> = task.input["address"].as_str().and_then(|a| a.parse().ok());
    let Some(address) = address else {
        return Resume::Unreadable("no address in the task's input".into());
    };
    let (op_kind, target) = match kind {
        TaskKind::IpAdd => (IpOpKind::Add, None),
        TaskKind::IpRemove => (IpOpKind::Remove, None),
        TaskKind::IpMove => {
            let target = task.input["target_vps_id"]
                .as_str()
                .and_then(|t| Uuid::parse_str(t).ok());
            match target {
                Some(t) => (IpOpKind::Move, Some(t)),
                None => return Resume::Unreadable("no target_vps_id in the move's input".into()),
            }
        }
        other => return Resume::Unreadable(format!("{other} is not an address task")),
    };
    // A move holds its target too, under the same task.
    let target_claim = match target {
        Some(t) => match ctx.engine.claim(t, task.id, kind.as_str()) {
            Ok(c) => Some(c),
            Err(_) => return Resume::Unreadable("its target is busy".into()),
        },
        None => None,
    };
    let op = SharedIpOp(Arc::new(IpOp {
        ctx: ctx.clone(),
        vm: task.vps_id,
        target,
        address,
        kind: op_kind,
        live: Default::default(),
        _target_claim: target_claim,
    }));
    Resume::run(ctx, kind, op)
}

fn prefix(ctx: &Ctx, a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => ctx.pool.prefix(),
        IpAddr::V6(_) => ctx
            .config
            .network
            .pool6
            .as_ref()
            .map(|p| p.cidr.prefix())
            .unwrap_or(64),
    }
}

impl IpOp {
    /// Adds the address inside the guest now, if its agent answers.
    async fn guest_add(&self, vm: Uuid) -> Result<bool, VmError> {
        let a = self.address.to_string();
        let p = prefix(&self.ctx, self.address);
        let (a, dev) = (shell_safe(&a)?, PRIMARY_ADAPTER);
        let script = match self.address {
            IpAddr::V4(_) => format!(
                "ip addr replace {a}/{p} dev {dev} && \
                 (arping -c 2 -U -I {dev} {a} >/dev/null 2>&1 || true)"
            ),
            IpAddr::V6(_) => format!("ip -6 addr replace {a}/{p} dev {dev} nodad"),
        };
        Ok(guest_script(&self.ctx, vm, &script).await? == Some(0))
    }

    async fn guest_remove(&self, vm: Uuid) -> Result<(), VmError> {
        let a = self.address.to_string();
        let p = prefix(&self.ctx, self.address);
        let a = shell_safe(&a)?;
        let script = format!("ip addr del {a}/{p} dev {PRIMARY_ADAPTER} 2>/dev/null; true");
        guest_script(&self.ctx, vm, &script).await?;
        Ok(())
    }

    async fn seed(&self, vm: Uuid) -> Result<(), VmError> {
        let row = self.ctx.vm(vm).await?;
        write_seed(&self.ctx, &row).await
    }

    async fn filter(&self, vm: Uuid) -> Result<(), VmError> {
        let row = self.ctx.vm(vm).await?;
        net::update_filter(&self.ctx, &row, Op::Network).await
    }

    async fn step(&self, step: IpStep) -> Result<(), VmError> {
        use IpStep::{Add, Move, Remove};
        let (ctx, vm, address) = (&self.ctx, self.vm, self.address);
        match step {
            Add(AddStep::AllocateIp) => {
                let owner = ctx
                    .store
                    .call(move |c| store::vms::ip_owner(c, address))
                    .await?;
                match owner {
                    Some(o) if o == vm => Ok(()),
                    _ => Err(VmError::Ip(IpamError::InUse(address))),
                }
            }
            Add(AddStep::UpdateFilter)
            | Remove(RemoveStep::UpdateFilter)
            | Move(MoveStep::UpdateSourceFilter) => self.filter(vm).await,
            Add(AddStep::UpdateGuest) => {
                self.seed(vm).await?;
                let live = self.guest_add(vm).await?;
                self.live.store(live, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Remove(RemoveStep::MarkReleasing) | Move(MoveStep::MarkReleasing) => Ok(ctx
                .store
                .call(move |c| store::networks::mark_releasing(c, address, vm))
                .await?),
            Remove(RemoveStep::UpdateGuest) => {
                self.seed(vm).await?;
                self.guest_remove(vm).await
            }
            Remove(RemoveStep::ReleaseIp) => Ok(ctx
                .store
                .call(move |c| store::networks::delete_ip(c, address, vm))
                .await?),
            Remove(RemoveStep::ForgetNeighbour) | Move(MoveStep::ForgetNeighbour) => ctx
                .net
                .forget_neighbour(address)
                .await
                .map_err(|e| VmError::Internal(e.to_string())),
            Move(MoveStep::RemoveFromSource) => {
                self.seed(vm).await?;
                self.guest_remove(vm).await
            }
            Move(MoveStep::Reassign) => {
                let target = self.target.expect("a move has a target");
                let moved = ctx
                    .store
                    .call(move |c| store::networks::reassign_ip(c, address, vm, target))
                    .await?;
                let owner = ctx
                    .store
                    .call(move |c| store::vms::ip_owner(c, address))
                    .await?;
                if moved || owner == Some(target) {
                    Ok(())
                } else {
                    Err(VmError::IpNotFound(address.to_string()))
                }
            }
            Move(MoveStep::UpdateTargetFilter) => {
                self.filter(self.target.expect("a move has a target")).await
            }
            Move(MoveStep::AddToTarget) => {
                let target = self.target.expect("a move has a target");
                self.seed(target).await?;
                let live = self.guest_add(target).await?;
                self.live.store(live, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        }
    }

    async fn undo(&self, step: IpStep) -> Result<(), VmError> {
        let (ctx, vm, address) = (&self.ctx, self.vm, self.address);
        match step {
            IpStep::Add(AddStep::AllocateIp) => {
                ctx.store
                    .call(move |c| store::networks::delete_ip(c, address, vm))
                    .await?;
                self.filter(vm).await
            }
            IpStep::Add(AddStep::UpdateGuest) => {
                self.guest_remove(vm).await?;
                Ok(())
            }
            // The filter follows the store, which the allocation's undo restored.
            IpStep::Add(AddStep::UpdateFilter) => Ok(()),
            // Removals and moves go forward, never back (`rolls_back`).
            IpStep::Remove(_) | IpStep::Move(_) => Ok(()),
        }
    }
}

impl Operation for SharedIpOp {
    type Error = VmError;
    type Step = IpStep;

    fn steps(&self) -> &'static [Self::Step] {
        match self.0.kind {
            IpOpKind::Add => ADD_STEPS,
            IpOpKind::Remove => REMOVE_STEPS,
            IpOpKind::Move => MOVE_STEPS,
        }
    }

    /// An added address is taken back if its task fails; removals and moves go forward
    /// (every step can be repeated) so the store's answer always wins.
    fn rolls_back(&self) -> bool {
        self.0.kind == IpOpKind::Add
    }

    async fn run_step(&self, step: IpStep, _ctx: &StepCtx) -> Result<(), VmError> {
        self.0.step(step).await
    }

    async fn undo_step(&self, step: IpStep) -> Result<(), VmError> {
        self.0.undo(step).await
    }
}

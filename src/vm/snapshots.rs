//! Snapshots: internal qcow2 snapshots of a VM's disk, optionally with the guest's memory.
//!
//! | VM is      | create (disk only)              | create (`include_ram`)  | rollback                      |
//! |------------|---------------------------------|-------------------------|-------------------------------|
//! | running    | fsfreeze + QMP internal snapshot | QMP `snapshot-save` job | RAM: `snapshot-load` live; disk only: power off, revert, boot |
//! | paused     | QMP internal snapshot            | QMP `snapshot-save` job | as running                    |
//! | stopped    | `qemu-img snapshot -c`           | refused (no memory)     | RAM: start paused, load, resume; disk only: `qemu-img snapshot -a`, stays off |
//!
//! After a rollback the VM is running if it was running before, or if the snapshot holds
//! memory (which is the state of a running guest). A disk grown after the snapshot was taken
//! is grown back to the VM's size after the revert (the data is the snapshot's).
//!
//! Each call is a task holding the VM's claim, so snapshots never race a power action,
//! resize or delete. A record is written (`creating`) when the snapshot is admitted, under
//! the same transaction as the name and limit checks; an interrupted create is unwound at
//! the next start (the half-made snapshot is deleted from the disk), interrupted rollbacks
//! and deletes are repeated. Deleting the VM removes its snapshots with its disk; reinstall
//! and a shrinking resize re-clone the disk, so they remove its snapshots too (the
//! listing is emptied in the same task).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::validate::{self, ValidationError};
use super::{net, Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::hypervisor::{guest, snapshot as live, HypervisorError, PowerState};
use crate::store::{self, NewTask, SnapshotRow, SnapshotState};
use crate::tasks::{Operation, StepCtx};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const MAX_DESCRIPTION: usize = 500;

crate::steps! {
    /// The snapshot tasks' steps (take, roll back, delete), by the names the journal stores.
    pub(crate) enum SnapshotStep {
        TakeSnapshot = "take_snapshot",
        RecordSnapshot = "record_snapshot",
        PrepareVm = "prepare_vm",
        RevertDisk = "revert_disk",
        RestorePower = "restore_power",
        DeleteSnapshot = "delete_snapshot",
        ForgetSnapshot = "forget_snapshot",
    }
}

pub(crate) const CREATE_STEPS: &[SnapshotStep] =
    &[SnapshotStep::TakeSnapshot, SnapshotStep::RecordSnapshot];
pub(crate) const ROLLBACK_STEPS: &[SnapshotStep] = &[
    SnapshotStep::PrepareVm,
    SnapshotStep::RevertDisk,
    SnapshotStep::RestorePower,
];
pub(crate) const DELETE_STEPS: &[SnapshotStep] =
    &[SnapshotStep::DeleteSnapshot, SnapshotStep::ForgetSnapshot];

/// `POST /v1/vms/{id}/snapshots`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    #[schema(value_type = String, required = true, pattern = "^[A-Za-z0-9_]{1,40}$",
        example = "before_upgrade")]
    pub name: Option<String>,
    /// At most 500 characters, no control characters.
    #[schema(max_length = 500)]
    pub description: Option<String>,
    /// Save the guest's memory too (the VM must be running); default false.
    pub include_ram: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    pub description: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Holds the guest's memory: a rollback resumes the guest where it was.
    pub vmstate: bool,
}

impl From<SnapshotRow> for Snapshot {
    fn from(r: SnapshotRow) -> Snapshot {
        Snapshot {
            name: r.name,
            description: r.description,
            created_at: r.created_at,
            vmstate: r.vmstate,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotList {
    pub vps_id: Uuid,
    pub snapshots: Vec<Snapshot>,
    pub limits: SnapshotLimits,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotLimits {
    pub max_snapshots: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotCreated {
    pub vps_id: Uuid,
    pub snapshot: Snapshot,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotDone {
    pub vps_id: Uuid,
    pub name: String,
    /// The VM's status afterwards.
    pub status: super::VmStatus,
}

/// What a snapshot task needs to run again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotInput {
    pub name: String,
    pub include_ram: bool,
    /// The VM was running (or paused) when the task was admitted.
    pub was_running: bool,
}

/// Refuses a snapshot that would take the VM's snapshots beyond their allowance
/// (`snapshots.max_percent_of_disk` of its disk), or the node's storage beyond what may be
/// allocated: `needed` is what the snapshot stores at once (the guest's memory).
async fn check_allowance(ctx: &Ctx, vm: &store::VmRow, needed: u64) -> Result<(), VmError> {
    let id = vm.id;
    let used = ctx
        .disks
        .snapshot_usage(id)
        .await
        .map_err(|e| VmError::storage(Op::Snapshot, e))?;
    let allowance =
        (vm.disk_gb * GIB).saturating_mul(ctx.config.snapshots.max_percent_of_disk) / 100;
    if used.saturating_add(needed) > allowance {
        return Err(VmError::SnapshotQuota(format!(
            "the VPS's snapshots hold {} MiB of their {} MiB allowance \
             (snapshots.max_percent_of_disk of its disk); this snapshot needs {} MiB more: \
             delete a snapshot first",
            used / MIB,
            allowance / MIB,
            needed / MIB
        )));
    }
    let (alloc, before) = ctx
        .store
        .call(move |c| {
            Ok((
                store::vms::allocation(c)?,
                store::vms::snapshot_bytes(c, id)?,
            ))
        })
        .await?;
    let capacity = (ctx.host.storage_gb as f64 * ctx.config.capacity.disk_overcommit) as u64 * GIB;
    let committed = (alloc.disk_gb * GIB + alloc.snapshot_bytes)
        .saturating_sub(before)
        .saturating_add(used)
        .saturating_add(needed);
    if committed > capacity {
        return Err(VmError::InsufficientCapacity(format!(
            "storage: the node's disks and snapshots would take {} GiB of the {} GiB it may \
             allocate",
            committed.div_ceil(GIB),
            capacity / GIB
        )));
    }
    Ok(())
}

/// Measures and records what the VM's snapshots hold now (for the node's capacity).
async fn record_usage(ctx: &Ctx, id: Uuid) {
    match ctx.disks.snapshot_usage(id).await {
        Ok(bytes) => {
            if let Err(e) = ctx
                .store
                .call(move |c| store::vms::set_snapshot_bytes(c, id, bytes))
                .await
            {
                tracing::warn!(vps = %id, error = %e, "cannot record snapshot usage");
            }
        }
        Err(e) => tracing::warn!(vps = %id, error = %e, "cannot measure snapshot usage"),
    }
}

/// A snapshot description as stored and listed: at most 500 characters, no control characters.
pub fn description(d: Option<String>) -> Result<String, VmError> {
    let d = d.unwrap_or_default();
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(|c| c.is_control()) {
        return Err(ValidationError::InvalidField {
            field: "description",
            reason: format!("at most {MAX_DESCRIPTION} characters, no control characters"),
        }
        .into());
    }
    Ok(d)
}

impl VmManager {
    pub async fn snapshots(&self, id: Uuid) -> Result<SnapshotList, VmError> {
        self.ctx.vm(id).await?;
        let rows = self
            .ctx
            .store
            .call(move |c| store::snapshots::list(c, id))
            .await?;
        Ok(SnapshotList {
            vps_id: id,
            snapshots: rows
                .into_iter()
                .filter(|r| r.state == SnapshotState::Ready)
                .map(Snapshot::from)
                .collect(),
            limits: SnapshotLimits {
                max_snapshots: self.ctx.config.snapshots.max_per_vm,
            },
        })
    }

    pub async fn snapshot_create(
        &self,
        id: Uuid,
        req: CreateSnapshotRequest,
    ) -> Result<SnapshotCreated, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        let name = req
            .name
            .ok_or(ValidationError::MissingFields(vec!["name"]))?;
        validate::snapshot_name(&name)?;
        let description = description(req.description)?;
        let include_ram = req.include_ram.unwrap_or(false);
        ctx.admit_recorded(TaskKind::SnapshotCreate, &vm)?;
        let claim = ctx.claim(id, TaskKind::SnapshotCreate)?;
        let was_running = running(ctx, id, Op::Snapshot).await?;
        if include_ram && !was_running {
            return Err(VmError::InvalidState(
                "include_ram needs a running VPS: a stopped one has no memory to save".into(),
            ));
        }
        // What the snapshot stores at once: the guest's memory. Disk-only snapshots start
        // empty and grow as the guest rewrites data, which the floor leaves room for.
        let needed = if include_ram { vm.ram_mb * MIB } else { 0 };
        let floor = ctx.config.snapshots.min_free_gb * GIB;
        let free = ctx
            .disks
            .free_bytes()
            .map_err(|e| VmError::storage(Op::Snapshot, e))?;
        if free < floor.saturating_add(needed) {
            return Err(VmError::InsufficientStorage(format!(
                "VM storage has {} MiB free; this snapshot needs {} MiB and {} GiB must stay \
                 free (snapshots.min_free_gb)",
                free / MIB,
                needed / MIB,
                floor / GIB
            )));
        }
        check_allowance(ctx, &vm, needed).await?;
        let disk_bytes = crate::storage::virtual_size(&ctx.disks.disk_path(id))
            .await
            .map_err(|e| VmError::storage(Op::Snapshot, e))?;
        let input = SnapshotInput {
            name: name.clone(),
            include_ram,
            was_running,
        };
        let row = SnapshotRow {
            vps_id: id,
            name: name.clone(),
            description,
            vmstate: include_ram,
            state: SnapshotState::Creating,
            disk_bytes,
            created_at: crate::time::now(),
        };
        let (task, max, now) = (
            claim.task(),
            ctx.config.snapshots.max_per_vm,
            crate::time::now(),
        );
        let task_input =
            serde_json::to_value(&input).map_err(|e| VmError::Internal(e.to_string()))?;
        let inserted = row.clone();
        ctx.store
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let existing = store::snapshots::list(&tx, id)?;
                if existing.iter().any(|s| s.name == inserted.name) {
                    return Ok(Err(VmError::SnapshotExists(inserted.name)));
                }
                if existing.len() >= max {
                    return Ok(Err(VmError::SnapshotLimit(max)));
                }
                store::snapshots::insert(&tx, &inserted)?;
                store::tasks::insert(
                    &tx,
                    &NewTask {
                        id: task,
                        kind: TaskKind::SnapshotCreate.as_str(),
                        vps_id: id,
                        input: task_input,
                        steps: &crate::tasks::step_names(CREATE_STEPS),
                        now: &now,
                    },
                )?;
                tx.commit()?;
                Ok(Ok(()))
            })
            .await??;
        tracing::info!(vps = %id, snapshot = %name, include_ram, was_running, "snapshot");
        let op = SnapshotOp::new(self.ctx.clone(), id, Kind::Create, input);
        let outcome = ctx
            .engine
            .run(claim, TaskKind::SnapshotCreate.as_str(), op)
            .await;
        record_usage(ctx, id).await;
        outcome?;
        let row = ctx
            .store
            .call(move |c| store::snapshots::get(c, id, &name))
            .await?
            .ok_or_else(|| VmError::Internal("snapshot record vanished".into()))?;
        Ok(SnapshotCreated {
            vps_id: id,
            snapshot: row.into(),
        })
    }

    pub async fn snapshot_rollback(&self, id: Uuid, name: &str) -> Result<SnapshotDone, VmError> {
        self.snapshot_task(id, name, Kind::Rollback).await
    }

    pub async fn snapshot_delete(&self, id: Uuid, name: &str) -> Result<SnapshotDone, VmError> {
        self.snapshot_task(id, name, Kind::Delete).await
    }

    async fn snapshot_task(
        &self,
        id: Uuid,
        name: &str,
        kind: Kind,
    ) -> Result<SnapshotDone, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        validate::snapshot_name(name).map_err(|_| VmError::SnapshotNotFound(name.to_owned()))?;
        let owned = name.to_owned();
        let row = ctx
            .store
            .call(move |c| store::snapshots::get(c, id, &owned))
            .await?
            .filter(|r| r.state == SnapshotState::Ready)
            .ok_or_else(|| VmError::SnapshotNotFound(name.to_owned()))?;
        ctx.admit_recorded(kind.task_kind(), &vm)?;
        let claim = ctx.claim(id, kind.task_kind())?;
        let was_running = running(ctx, id, Op::Snapshot).await?;
        let input = SnapshotInput {
            name: row.name.clone(),
            include_ram: row.vmstate,
            was_running,
        };
        ctx.record_task(
            &claim,
            kind.task_kind(),
            kind.steps(),
            serde_json::to_value(&input).map_err(|e| VmError::Internal(e.to_string()))?,
        )
        .await?;
        tracing::info!(vps = %id, snapshot = %name, kind = kind.as_str(), was_running, "snapshot task");
        let op = SnapshotOp::new(self.ctx.clone(), id, kind, input);
        let outcome = ctx.engine.run(claim, kind.as_str(), op).await;
        record_usage(ctx, id).await;
        outcome?;
        let vm = ctx.vm(id).await?;
        Ok(SnapshotDone {
            vps_id: id,
            name: name.to_owned(),
            status: self.status_of(&vm).await,
        })
    }
}

/// Whether QEMU runs the domain (running or paused); refuses states that cannot be
/// snapshotted consistently.
async fn running(ctx: &Ctx, id: Uuid, op: Op) -> Result<bool, VmError> {
    match ctx.hv.power_state(id).await {
        Ok(Some(PowerState::Running | PowerState::Paused)) => Ok(true),
        Ok(Some(PowerState::Shutoff | PowerState::Crashed)) => Ok(false),
        Ok(Some(other)) => Err(VmError::InvalidState(format!(
            "the VPS is {other:?}; retry once it is running or stopped"
        ))),
        Ok(None) => Err(VmError::Failed {
            op,
            message: "the VPS's domain is missing from libvirt".into(),
        }),
        Err(e) => Err(VmError::hypervisor(op, e)),
    }
}

/// A snapshot task found unfinished at startup, finished from the step it reached.
pub(crate) fn resume(ctx: &Arc<Ctx>, task: &store::TaskRow) -> Resume {
    let kind = match TaskKind::parse(&task.kind) {
        Some(TaskKind::SnapshotCreate) => Kind::Create,
        Some(TaskKind::SnapshotRollback) => Kind::Rollback,
        Some(TaskKind::SnapshotDelete) => Kind::Delete,
        _ => return Resume::Unreadable(format!("{} is not a snapshot task", task.kind)),
    };
    Resume::from_input(ctx, kind.task_kind(), task, |input| {
        SnapshotOp::resumed(ctx.clone(), task.vps_id, kind, input)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Create,
    Rollback,
    Delete,
}

impl Kind {
    fn task_kind(self) -> TaskKind {
        match self {
            Kind::Create => TaskKind::SnapshotCreate,
            Kind::Rollback => TaskKind::SnapshotRollback,
            Kind::Delete => TaskKind::SnapshotDelete,
        }
    }

    fn as_str(self) -> &'static str {
        self.task_kind().as_str()
    }

    fn steps(self) -> &'static [SnapshotStep] {
        match self {
            Kind::Create => CREATE_STEPS,
            Kind::Rollback => ROLLBACK_STEPS,
            Kind::Delete => DELETE_STEPS,
        }
    }
}

pub(crate) struct SnapshotOp {
    ctx: Arc<Ctx>,
    id: Uuid,
    kind: Kind,
    input: SnapshotInput,
    /// Rebuilt after an agent restart: a create is unwound rather than repeated (the
    /// moment the client asked to capture has passed).
    interrupted: bool,
    /// The rollback started a stopped VM paused to load memory into it.
    started_paused: std::sync::atomic::AtomicBool,
}

impl SnapshotOp {
    fn new(ctx: Arc<Ctx>, id: Uuid, kind: Kind, input: SnapshotInput) -> SnapshotOp {
        SnapshotOp {
            ctx,
            id,
            kind,
            input,
            interrupted: false,
            started_paused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The operation of an unfinished task found at startup.
    fn resumed(ctx: Arc<Ctx>, id: Uuid, kind: Kind, input: SnapshotInput) -> SnapshotOp {
        let mut op = SnapshotOp::new(ctx, id, kind, input);
        op.interrupted = true;
        op
    }

    fn hv(&self, e: HypervisorError) -> VmError {
        VmError::hypervisor(Op::Snapshot, e)
    }

    fn name(&self) -> &str {
        &self.input.name
    }

    async fn qemu_runs(&self) -> Result<bool, VmError> {
        running(&self.ctx, self.id, Op::Snapshot).await
    }

    async fn node(&self) -> Result<String, VmError> {
        let path = self.ctx.disks.disk_path(self.id);
        let path = path
            .to_str()
            .ok_or_else(|| VmError::Internal("disk path is not UTF-8".into()))?;
        live::disk_node(self.ctx.hv.as_ref(), self.id, path)
            .await
            .map_err(|e| self.hv(e))
    }

    fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.ctx.config.snapshots.job_timeout_s)
    }

    async fn take(&self) -> Result<(), VmError> {
        if self.interrupted {
            return Err(VmError::Failed {
                op: Op::Snapshot,
                message: "interrupted by an agent restart; take the snapshot again".into(),
            });
        }
        // A leftover of the same name (from a create that died before its record) would
        // make the new snapshot ambiguous.
        self.remove_from_disk().await?;
        let (hv, id) = (self.ctx.hv.as_ref(), self.id);
        if !self.qemu_runs().await? {
            if self.input.include_ram {
                return Err(VmError::InvalidState(
                    "the VPS stopped before its memory could be saved".into(),
                ));
            }
            return self
                .ctx
                .disks
                .snapshot_offline(id, self.name())
                .await
                .map_err(|e| VmError::storage(Op::Snapshot, e));
        }
        let node = self.node().await?;
        if self.input.include_ram {
            return live::save_with_memory(hv, id, &node, self.name(), self.job_timeout())
                .await
                .map_err(|e| self.hv(e));
        }
        // Quiesce the guest's filesystems when its agent answers; otherwise the snapshot
        // is crash-consistent, like pulling the plug at this instant.
        let frozen = guest::freeze(hv, id).await;
        if let Err(e) = &frozen {
            tracing::info!(vps = %id, error = %e, "no filesystem freeze; snapshot is crash-consistent");
        }
        let taken = live::take_disk_only(hv, id, &node, self.name()).await;
        if frozen.is_ok() {
            if let Err(e) = guest::thaw(hv, id).await {
                tracing::error!(vps = %id, error = %e, "cannot thaw the guest's filesystems");
            }
        }
        taken.map_err(|e| self.hv(e))
    }

    /// Deletes the snapshot from the disk, live or offline; absent is fine.
    async fn remove_from_disk(&self) -> Result<(), VmError> {
        if self.qemu_runs().await? {
            let node = self.node().await?;
            live::delete(self.ctx.hv.as_ref(), self.id, &node, self.name())
                .await
                .map_err(|e| self.hv(e))
        } else {
            self.ctx
                .disks
                .delete_snapshot_offline(self.id, self.name())
                .await
                .map_err(|e| VmError::storage(Op::Snapshot, e))
        }
    }

    /// Fails unless the disk holds the snapshot (a record without it is never reverted to).
    async fn ensure_on_disk(&self) -> Result<(), VmError> {
        let names: Vec<String> = if self.qemu_runs().await? {
            let node = self.node().await?;
            live::names(self.ctx.hv.as_ref(), self.id, &node)
                .await
                .map_err(|e| self.hv(e))?
        } else {
            self.ctx
                .disks
                .image_snapshots(self.id)
                .await
                .map_err(|e| VmError::storage(Op::Snapshot, e))?
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        if names.iter().any(|n| n == self.name()) {
            Ok(())
        } else {
            Err(VmError::Failed {
                op: Op::Snapshot,
                message: format!("the disk no longer holds snapshot {:?}", self.name()),
            })
        }
    }

    async fn prepare_rollback(&self) -> Result<(), VmError> {
        let (hv, id) = (&self.ctx.hv, self.id);
        let runs = self.qemu_runs().await?;
        if self.input.include_ram {
            if !runs {
                // Memory can only be loaded into a QEMU process: start one with the guest's
                // CPUs stopped, so nothing runs before the snapshot's state is in place.
                hv.start_paused(id).await.map_err(|e| self.hv(e))?;
                self.started_paused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let vm = self.ctx.vm(id).await?;
                net::plug(&self.ctx, &vm, Op::Snapshot).await?;
            }
        } else if runs {
            // The disk is about to be replaced under the guest: whatever it runs now is
            // discarded, so there is nothing to shut down gracefully.
            hv.destroy(id).await.map_err(|e| self.hv(e))?;
        }
        Ok(())
    }

    async fn revert(&self) -> Result<(), VmError> {
        self.ensure_on_disk().await?;
        let id = self.id;
        if self.input.include_ram {
            let node = self.node().await?;
            live::load(
                self.ctx.hv.as_ref(),
                id,
                &node,
                self.name(),
                self.job_timeout(),
            )
            .await
            .map_err(|e| self.hv(e))?;
        } else {
            self.ctx
                .disks
                .revert_offline(id, self.name())
                .await
                .map_err(|e| VmError::storage(Op::Snapshot, e))?;
        }
        self.regrow_disk().await
    }

    /// A revert restores the disk size the snapshot was taken at; the VM keeps its plan's.
    async fn regrow_disk(&self) -> Result<(), VmError> {
        let vm = self.ctx.vm(self.id).await?;
        let want = vm.disk_gb * GIB;
        let path = self.ctx.disks.disk_path(self.id);
        if self.qemu_runs().await? {
            let node = self.node().await?;
            let size = live::virtual_size(self.ctx.hv.as_ref(), self.id, &node)
                .await
                .map_err(|e| self.hv(e))?
                .unwrap_or(want);
            if size < want {
                self.ctx
                    .hv
                    .grow_disk_live(self.id, "vda", want)
                    .await
                    .map_err(|e| self.hv(e))?;
            }
            Ok(())
        } else {
            let size = crate::storage::virtual_size(&path)
                .await
                .map_err(|e| VmError::storage(Op::Snapshot, e))?;
            if size < want {
                self.ctx
                    .disks
                    .grow_disk(self.id, vm.disk_gb)
                    .await
                    .map_err(|e| VmError::storage(Op::Snapshot, e))?;
            }
            Ok(())
        }
    }

    async fn restore_power(&self) -> Result<(), VmError> {
        let (hv, id) = (&self.ctx.hv, self.id);
        match hv.power_state(id).await.map_err(|e| self.hv(e))? {
            Some(PowerState::Paused) if self.input.include_ram => {
                hv.resume(id).await.map_err(|e| self.hv(e))
            }
            Some(PowerState::Shutoff | PowerState::Crashed) if self.input.was_running => {
                let vm = self.ctx.vm(id).await?;
                super::domain::start_domain(&self.ctx, &vm, Op::Snapshot).await
            }
            _ => Ok(()),
        }
    }

    async fn forget(&self) -> Result<(), VmError> {
        let (id, name) = (self.id, self.input.name.clone());
        self.ctx
            .store
            .call(move |c| store::snapshots::delete(c, id, &name))
            .await?;
        Ok(())
    }
}

impl Operation for SnapshotOp {
    type Error = VmError;
    type Step = SnapshotStep;

    fn steps(&self) -> &'static [Self::Step] {
        self.kind.steps()
    }

    fn rolls_back(&self) -> bool {
        self.kind == Kind::Create
    }

    async fn run_step(&self, step: SnapshotStep, _ctx: &StepCtx) -> Result<(), VmError> {
        match step {
            SnapshotStep::TakeSnapshot => self.take().await,
            SnapshotStep::RecordSnapshot => {
                let (id, name, vmstate) =
                    (self.id, self.input.name.clone(), self.input.include_ram);
                self.ctx
                    .store
                    .call(move |c| store::snapshots::set_ready(c, id, &name, vmstate))
                    .await?;
                Ok(())
            }
            SnapshotStep::PrepareVm => self.prepare_rollback().await,
            SnapshotStep::RevertDisk => self.revert().await,
            SnapshotStep::RestorePower => self.restore_power().await,
            SnapshotStep::DeleteSnapshot => self.remove_from_disk().await,
            SnapshotStep::ForgetSnapshot => self.forget().await,
        }
    }

    async fn undo_step(&self, step: SnapshotStep) -> Result<(), VmError> {
        match step {
            SnapshotStep::TakeSnapshot => self.remove_from_disk().await,
            // The record is the last step of a take; rollbacks and deletes go forward
            // (`rolls_back`).
            SnapshotStep::RecordSnapshot
            | SnapshotStep::PrepareVm
            | SnapshotStep::RevertDisk
            | SnapshotStep::RestorePower
            | SnapshotStep::DeleteSnapshot
            | SnapshotStep::ForgetSnapshot => Ok(()),
        }
    }

    async fn finish(&self, outcome: Result<(), &VmError>) {
        let Err(e) = outcome else { return };
        match self.kind {
            Kind::Create => {
                if let Err(e) = self.forget().await {
                    tracing::error!(vps = %self.id, error = %e, "cannot drop the failed snapshot's record");
                }
            }
            Kind::Rollback => {
                // A stopped VM started only to load memory goes back to stopped.
                if self
                    .started_paused
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    if let Err(e) = self.ctx.hv.destroy(self.id).await {
                        tracing::error!(vps = %self.id, error = %e, "cannot power off after a failed rollback");
                    }
                }
                tracing::warn!(vps = %self.id, snapshot = %self.input.name, error = %e, "rollback failed");
            }
            Kind::Delete => {}
        }
    }
}

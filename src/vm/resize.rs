//! Resizing a VM: CPU, RAM and disk.
//!
//! - CPU and RAM change in the persistent definition and apply at the next boot; with
//!   `restart: true` a running VM is restarted (ACPI, then power-off) so they apply now.
//! - A larger disk keeps its data: a running VM's disk grows live (`virDomainBlockResize`,
//!   the guest sees the new size at once; cloud-init grows the root filesystem at the next
//!   boot), a stopped VM's image grows offline.
//! - A smaller disk cannot keep data. It needs `confirm_data_loss: true` and
//!   `erase_confirmation: "ERASE"`, and then the disk is re-created from the VM's template at
//!   the new size with a fresh cloud-init instance (same password hash, keys and addresses).
//!
//! The new resources are recorded when the resize is admitted, in the same transaction as
//! the capacity check, so two resizes and creates cannot overbook the host; a failure
//! before the disk changed puts the old values back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{define, ensure_off, shutdown, start_domain, write_seed, StopOptions};
use super::model::{ResizeRequest, TaskAccepted};
use super::validate::{self, ValidationError};
use super::{Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::hypervisor::{HypervisorError, PowerState};
use crate::store::{self, NewTask, VmRowState};
use crate::tasks::{Operation, StepCtx};

crate::steps! {
    /// The resize task's steps, by the names the journal stores.
    pub(crate) enum ResizeStep {
        ApplyDefinition = "apply_definition",
        ResizeDisk = "resize_disk",
        RestartVm = "restart_vm",
    }
}

pub(crate) const RESIZE_STEPS: &[ResizeStep] = &[
    ResizeStep::ApplyDefinition,
    ResizeStep::ResizeDisk,
    ResizeStep::RestartVm,
];

const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ResizeInput {
    pub old: (u32, u64, u64),
    pub new: (u32, u64, u64),
    /// The disk shrinks: re-create it (confirmed by the client).
    pub erase: bool,
    pub restart: bool,
    pub was_running: bool,
}

impl ResizeInput {
    fn cpu_or_ram_changed(&self) -> bool {
        self.old.0 != self.new.0 || self.old.1 != self.new.1
    }
}

impl VmManager {
    pub async fn resize(&self, id: Uuid, req: ResizeRequest) -> Result<TaskAccepted, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        if req.cpu_cores.is_none()
            && req.ram_mb.is_none()
            && req.disk_gb.is_none()
            && req.autostart.is_none()
        {
            return Err(ValidationError::MissingFields(vec![
                "cpu_cores",
                "ram_mb",
                "disk_gb",
                "autostart",
            ])
            .into());
        }
        let (cpu, ram, disk) =
            validate::resources(req.cpu_cores, req.ram_mb, req.disk_gb, &ctx.config.capacity)?;
        let new = (
            cpu.unwrap_or(vm.cpu_cores),
            ram.unwrap_or(vm.ram_mb),
            disk.unwrap_or(vm.disk_gb),
        );
        let old = (vm.cpu_cores, vm.ram_mb, vm.disk_gb);
        let erase = new.2 < old.2;
        if erase {
            let confirmed = req.confirm_data_loss == Some(true)
                && req.erase_confirmation.as_deref() == Some("ERASE");
            if !confirmed {
                return Err(ValidationError::ConfirmationRequired.into());
            }
            let template = ctx
                .images
                .get(&vm.template_id)
                .await
                .map_err(|_| ValidationError::InvalidTemplate(vm.template_id.clone()))?;
            if new.2 * GIB < template.virtual_size {
                return Err(ValidationError::InvalidResources(format!(
                    "disk_gb {} is smaller than template {} ({} GB)",
                    new.2,
                    template.id,
                    template.virtual_size.div_ceil(GIB)
                ))
                .into());
            }
        }
        let claim = ctx.claim(id, TaskKind::Resize)?;
        let status = self.status_of(&vm).await;
        super::admit(TaskKind::Resize, status)?;
        let was_running = super::state::runs(status);
        let input = ResizeInput {
            old,
            new,
            erase,
            restart: req.restart.unwrap_or(false),
            was_running,
        };
        self.admit_resize(&claim, &input).await?;
        if let Some(autostart) = req.autostart {
            let now = crate::time::now();
            ctx.store
                .call(move |c| store::power::set_autostart(c, id, autostart, &now))
                .await?;
        }
        tracing::info!(vps = %id, task = %claim.task(), ?old, ?new, erase, "resize");
        let note = (was_running && input.cpu_or_ram_changed() && !input.restart)
            .then(|| "cpu_cores and ram_mb apply at the next boot".to_owned());
        let task_id = claim.task();
        let op = ResizeOp {
            ctx: self.ctx.clone(),
            id,
            input,
        };
        self.ctx.engine.launch(claim, TaskKind::Resize.as_str(), op);
        Ok(TaskAccepted {
            vps_id: id,
            task_id,
            kind: TaskKind::Resize.as_str(),
            name: vm.hostname,
            status,
            note,
        })
    }

    /// Checks capacity for the growth, records the new resources and the task, atomically.
    async fn admit_resize(
        &self,
        claim: &crate::tasks::Claim,
        input: &ResizeInput,
    ) -> Result<(), VmError> {
        let ctx = &self.ctx;
        let (id, task_id) = (claim.vm(), claim.task());
        let (host, limits) = (ctx.host, ctx.config.capacity.clone());
        let value = serde_json::to_value(input).map_err(|e| VmError::Internal(e.to_string()))?;
        let (old, new) = (input.old, input.new);
        let now = crate::time::now();
        ctx.store
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let mut alloc = store::vms::allocation(&tx)?;
                alloc.vms = alloc.vms.saturating_sub(1);
                alloc.cpu_cores = alloc.cpu_cores.saturating_sub(old.0 as u64);
                alloc.ram_mb = alloc.ram_mb.saturating_sub(old.1);
                alloc.disk_gb = alloc.disk_gb.saturating_sub(old.2);
                if let Err(why) = host.admits(&limits, &alloc, new.0, new.1, new.2) {
                    return Ok(Err(VmError::InsufficientCapacity(why)));
                }
                store::vms::set_resources(&tx, id, new.0, new.1, new.2, &now)?;
                store::tasks::insert(
                    &tx,
                    &NewTask {
                        id: task_id,
                        kind: TaskKind::Resize.as_str(),
                        vps_id: id,
                        input: value,
                        steps: &crate::tasks::step_names(RESIZE_STEPS),
                        now: &now,
                    },
                )?;
                tx.commit()?;
                Ok(Ok(()))
            })
            .await?
    }
}

pub(crate) struct ResizeOp {
    pub ctx: Arc<Ctx>,
    pub id: Uuid,
    pub input: ResizeInput,
}

impl ResizeOp {
    /// The task found unfinished at startup, resumed from its recorded input.
    pub(crate) fn resume(ctx: &Arc<Ctx>, task: &store::TaskRow) -> Resume {
        Resume::from_input(ctx, TaskKind::Resize, task, |input| ResizeOp {
            ctx: ctx.clone(),
            id: task.vps_id,
            input,
        })
    }

    fn hv(e: HypervisorError) -> VmError {
        VmError::hypervisor(Op::Action(super::state::Action::Restart), e)
    }

    async fn power(&self) -> Result<Option<PowerState>, VmError> {
        self.ctx.hv.power_state(self.id).await.map_err(Self::hv)
    }

    async fn resize_disk(&self) -> Result<(), VmError> {
        let (old, new) = (self.input.old.2, self.input.new.2);
        if self.input.erase {
            return self.erase_disk().await;
        }
        if new <= old {
            return Ok(());
        }
        match self.power().await? {
            Some(PowerState::Running | PowerState::Paused) => self
                .ctx
                .hv
                .grow_disk_live(self.id, "vda", new * GIB)
                .await
                .map_err(Self::hv),
            _ => self
                .ctx
                .disks
                .grow_disk(self.id, new)
                .await
                .map_err(|e| VmError::storage(Op::Resize, e)),
        }
    }

    /// Re-creates the disk from the template at the smaller size, with a new cloud-init
    /// instance so the guest provisions itself again.
    async fn erase_disk(&self) -> Result<(), VmError> {
        ensure_off(
            &self.ctx,
            self.id,
            Op::Action(super::state::Action::Restart),
        )
        .await?;
        let vm = self.ctx.vm(self.id).await?;
        let template = self
            .ctx
            .images
            .get(&vm.template_id)
            .await
            .map_err(|e| VmError::storage(Op::Resize, e))?;
        self.ctx
            .disks
            .remove_disk(self.id)
            .await
            .map_err(|e| VmError::storage(Op::Resize, e))?;
        // The snapshots lived in the erased disk.
        let id = self.id;
        self.ctx
            .store
            .call(move |c| crate::store::snapshots::delete_all(c, id))
            .await?;
        self.ctx
            .disks
            .create_disk(self.id, &template, self.input.new.2)
            .await
            .map_err(|e| VmError::storage(Op::Resize, e))?;
        let (id, now) = (self.id, crate::time::now());
        let instance = format!("{id}-{}", Uuid::new_v4().simple());
        let fresh = crate::store::VmRow {
            instance_id: instance.clone(),
            ..vm
        };
        write_seed(&self.ctx, &fresh).await?;
        self.ctx
            .store
            .call(move |c| store::vms::set_instance_id(c, id, &instance, &now))
            .await?;
        Ok(())
    }

    async fn restart_vm(&self) -> Result<(), VmError> {
        let running = matches!(
            self.power().await?,
            Some(PowerState::Running | PowerState::Paused)
        );
        let vm = self.ctx.vm(self.id).await?;
        if self.input.erase {
            if self.input.was_running && !running {
                start_domain(&self.ctx, &vm, Op::Resize).await?;
            }
            return Ok(());
        }
        if !(self.input.restart && running && self.input.cpu_or_ram_changed()) {
            return Ok(());
        }
        let restart = Op::Action(super::state::Action::Restart);
        shutdown(&self.ctx, self.id, restart, StopOptions::default()).await?;
        start_domain(&self.ctx, &vm, Op::Resize).await
    }

    /// Puts the old resources back (keeping a disk size that already took effect).
    async fn restore_resources(&self) -> Result<(), VmError> {
        let disk_now = crate::storage::virtual_size(&self.ctx.disks.disk_path(self.id))
            .await
            .map_err(|e| VmError::storage(Op::Resize, e))?;
        let (old, new) = (self.input.old, self.input.new);
        let disk = if disk_now >= new.2 * GIB && new.2 > old.2 || self.input.erase {
            new.2
        } else {
            old.2
        };
        let (id, now) = (self.id, crate::time::now());
        self.ctx
            .store
            .call(move |c| store::vms::set_resources(c, id, old.0, old.1, disk, &now))
            .await?;
        let vm = self.ctx.vm(self.id).await?;
        define(&self.ctx, &vm, Op::Resize).await
    }
}

impl Operation for ResizeOp {
    type Error = VmError;
    type Step = ResizeStep;

    fn steps(&self) -> &'static [Self::Step] {
        RESIZE_STEPS
    }

    async fn run_step(&self, step: ResizeStep, _ctx: &StepCtx) -> Result<(), VmError> {
        let vm = self.ctx.vm(self.id).await?;
        if vm.state != VmRowState::Active {
            return Err(VmError::InvalidState(
                "the VPS is no longer deployed".into(),
            ));
        }
        match step {
            ResizeStep::ApplyDefinition => define(&self.ctx, &vm, Op::Resize).await,
            ResizeStep::ResizeDisk => self.resize_disk().await,
            ResizeStep::RestartVm => self.restart_vm().await,
        }
    }

    async fn undo_step(&self, step: ResizeStep) -> Result<(), VmError> {
        match step {
            ResizeStep::ApplyDefinition => self.restore_resources().await,
            // A grown disk stays grown (its data is the customer's); a restart is not undone.
            ResizeStep::ResizeDisk | ResizeStep::RestartVm => Ok(()),
        }
    }
}

//! Reinstalling a VM: a fresh disk from a (possibly other) template, a fresh cloud-init
//! instance, the same id, MAC and addresses.
//!
//! The old disk is kept aside (`disk.prev.qcow2`) until the new system has booted and
//! answered, so a reinstall that fails puts the old disk, seed and definition back and the
//! customer keeps what they had. Only `finalize` discards the old disk.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{define, ensure_off, start_domain, write_seed};
use super::model::{ReinstallRequest, TaskAccepted};
use super::{readiness, validate, Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::cloudinit;
use crate::hypervisor::{HypervisorError, PowerState};
use crate::store::{self, VmRow, VmRowState};
use crate::tasks::{Operation, StepCtx};

crate::steps! {
    /// The reinstall task's steps, by the names the journal stores.
    pub(crate) enum ReinstallStep {
        ValidateTemplate = "validate_template",
        StopVm = "stop_vm",
        ReplaceDisk = "replace_disk",
        ApplyCloudInit = "apply_cloud_init",
        StartVm = "start_vm",
        WaitForGuestAgent = "wait_for_guest_agent",
        VerifyConnectivity = "verify_connectivity",
        Finalize = "finalize",
    }
}

pub(crate) const REINSTALL_STEPS: &[ReinstallStep] = &[
    ReinstallStep::ValidateTemplate,
    ReinstallStep::StopVm,
    ReinstallStep::ReplaceDisk,
    ReinstallStep::ApplyCloudInit,
    ReinstallStep::StartVm,
    ReinstallStep::WaitForGuestAgent,
    ReinstallStep::VerifyConnectivity,
    ReinstallStep::Finalize,
];

/// The task's input: what the VM becomes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReinstallInput {
    pub template_id: String,
    pub password_hash: String,
    pub ssh_keys: Vec<String>,
    pub instance_id: String,
    pub was_running: bool,
}

impl VmManager {
    pub async fn reinstall(
        &self,
        id: Uuid,
        req: ReinstallRequest,
    ) -> Result<TaskAccepted, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        let (Some(template_id), Some(password)) = (req.template_id, req.root_password) else {
            return Err(validate::ValidationError::MissingFields(vec![
                "template_id",
                "root_password",
            ])
            .into());
        };
        let template_id = template_id.into_string();
        validate::password(&password)?;
        let ssh_keys = match &req.ssh_keys {
            Some(keys) => validate::ssh_keys(keys)?,
            None => vm.ssh_keys.clone(),
        };
        let template = ctx
            .images
            .get(&template_id)
            .await
            .map_err(|_| validate::ValidationError::InvalidTemplate(template_id.clone()))?;
        if vm.disk_gb << 30 < template.virtual_size {
            return Err(validate::ValidationError::InvalidResources(format!(
                "template {template_id} needs {} GB, the VPS has {} GB",
                template.virtual_size.div_ceil(1 << 30),
                vm.disk_gb
            ))
            .into());
        }
        let claim = ctx.claim(id, TaskKind::Reinstall)?;
        let status = self.status_of(&vm).await;
        super::admit(TaskKind::Reinstall, status)?;
        let was_running = super::state::runs(status);
        let password_hash =
            tokio::task::spawn_blocking(move || cloudinit::hash_password(&password))
                .await
                .map_err(|e| VmError::Internal(e.to_string()))?
                .map_err(|e| VmError::cloud_init(Op::Reinstall, e))?;
        let input = ReinstallInput {
            template_id,
            password_hash,
            ssh_keys,
            instance_id: format!("{id}-{}", Uuid::new_v4().simple()),
            was_running,
        };
        ctx.record_task(
            &claim,
            TaskKind::Reinstall,
            REINSTALL_STEPS,
            serde_json::to_value(&input).map_err(|e| VmError::Internal(e.to_string()))?,
        )
        .await?;
        tracing::info!(vps = %id, task = %claim.task(), template = %input.template_id, "reinstall");
        let task_id = claim.task();
        let op = ReinstallOp {
            ctx: self.ctx.clone(),
            id,
            input,
        };
        self.ctx
            .engine
            .launch(claim, TaskKind::Reinstall.as_str(), op);
        Ok(TaskAccepted {
            vps_id: id,
            task_id,
            kind: TaskKind::Reinstall.as_str(),
            name: vm.hostname,
            status,
            note: None,
        })
    }
}

pub(crate) struct ReinstallOp {
    pub ctx: Arc<Ctx>,
    pub id: Uuid,
    pub input: ReinstallInput,
}

impl ReinstallOp {
    /// The task found unfinished at startup, resumed from its recorded input.
    pub(crate) fn resume(ctx: &Arc<Ctx>, task: &store::TaskRow) -> Resume {
        Resume::from_input(ctx, TaskKind::Reinstall, task, |input| ReinstallOp {
            ctx: ctx.clone(),
            id: task.vps_id,
            input,
        })
    }

    fn hv(e: HypervisorError) -> VmError {
        VmError::hypervisor(Op::Reinstall, e)
    }

    /// The VM as it will be once reinstalled.
    fn next(&self, vm: &VmRow) -> VmRow {
        VmRow {
            template_id: self.input.template_id.clone(),
            password_hash: self.input.password_hash.clone(),
            ssh_keys: self.input.ssh_keys.clone(),
            instance_id: self.input.instance_id.clone(),
            ..vm.clone()
        }
    }

    fn prev_disk(&self) -> std::path::PathBuf {
        self.ctx.disks.dir(self.id).join("disk.prev.qcow2")
    }

    async fn replace_disk(&self, vm: &VmRow) -> Result<(), VmError> {
        let disk = self.ctx.disks.disk_path(self.id);
        let prev = self.prev_disk();
        if !prev.exists() {
            tokio::fs::rename(&disk, &prev)
                .await
                .map_err(|e| VmError::host(Op::Reinstall, "cannot set the old disk aside", e))?;
        }
        let template = self
            .ctx
            .images
            .get(&self.input.template_id)
            .await
            .map_err(|e| VmError::storage(Op::Reinstall, e))?;
        self.ctx
            .disks
            .create_disk(self.id, &template, vm.disk_gb)
            .await
            .map_err(|e| VmError::storage(Op::Reinstall, e))?;
        define(&self.ctx, &self.next(vm), Op::Reinstall).await
    }

    async fn restore_disk(&self, vm: &VmRow) -> Result<(), VmError> {
        ensure_off(&self.ctx, self.id, Op::Reinstall).await?;
        let prev = self.prev_disk();
        if prev.exists() {
            let disk = self.ctx.disks.disk_path(self.id);
            tokio::fs::rename(&prev, &disk)
                .await
                .map_err(|e| VmError::Internal(format!("cannot restore the old disk: {e}")))?;
        }
        define(&self.ctx, vm, Op::Reinstall).await
    }

    async fn finalize(&self) -> Result<(), VmError> {
        let (id, now, input) = (self.id, crate::time::now(), self.input.clone());
        self.ctx
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                store::vms::set_install(
                    &tx,
                    id,
                    &input.template_id,
                    &input.password_hash,
                    &input.ssh_keys,
                    &input.instance_id,
                    &now,
                )?;
                // The snapshots lived in the old disk, which goes now.
                store::snapshots::delete_all(&tx, id)?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        crate::storage::remove_file_if_exists(&self.prev_disk())
            .await
            .map_err(|e| VmError::storage(Op::Reinstall, e))?;
        tracing::info!(vps = %id, template = %self.input.template_id, "reinstall completed");
        Ok(())
    }
}

impl Operation for ReinstallOp {
    type Error = VmError;
    type Step = ReinstallStep;

    fn steps(&self) -> &'static [Self::Step] {
        REINSTALL_STEPS
    }

    async fn run_step(&self, step: ReinstallStep, ctx: &StepCtx) -> Result<(), VmError> {
        let vm = self.ctx.vm(self.id).await?;
        if vm.state != VmRowState::Active {
            return Err(VmError::InvalidState(
                "the VPS is no longer deployed".into(),
            ));
        }
        match step {
            ReinstallStep::ValidateTemplate => {
                let t = self
                    .ctx
                    .images
                    .get(&self.input.template_id)
                    .await
                    .map_err(|e| VmError::storage(Op::Reinstall, e))?;
                self.ctx
                    .images
                    .verify(&t)
                    .await
                    .map_err(|e| VmError::storage(Op::Reinstall, e))
            }
            // The disk is about to be replaced: there is nothing to shut down gracefully for.
            ReinstallStep::StopVm => ensure_off(&self.ctx, self.id, Op::Reinstall).await,
            ReinstallStep::ReplaceDisk => self.replace_disk(&vm).await,
            ReinstallStep::ApplyCloudInit => write_seed(&self.ctx, &self.next(&vm)).await,
            ReinstallStep::StartVm => {
                start_domain(&self.ctx, &vm, Op::Reinstall).await?;
                match self.ctx.hv.power_state(self.id).await.map_err(Self::hv)? {
                    Some(PowerState::Running) => Ok(()),
                    other => Err(VmError::Failed {
                        op: Op::Reinstall,
                        message: format!("domain is {other:?} after start"),
                    }),
                }
            }
            ReinstallStep::WaitForGuestAgent => {
                let template = self.next(&vm).template_id;
                readiness::wait_for_guest_agent(&self.ctx, self.id, &template, ctx, Op::Reinstall)
                    .await
            }
            ReinstallStep::VerifyConnectivity => {
                readiness::verify_connectivity(&self.ctx, vm.ip_address, ctx, Op::Reinstall).await
            }
            ReinstallStep::Finalize => self.finalize().await,
        }
    }

    async fn undo_step(&self, step: ReinstallStep) -> Result<(), VmError> {
        let vm = self.ctx.vm(self.id).await?;
        match step {
            ReinstallStep::StopVm if self.input.was_running => {
                start_domain(&self.ctx, &vm, Op::Reinstall).await
            }
            ReinstallStep::ReplaceDisk => self.restore_disk(&vm).await,
            ReinstallStep::ApplyCloudInit => write_seed(&self.ctx, &vm).await,
            ReinstallStep::StartVm => ensure_off(&self.ctx, self.id, Op::Reinstall).await,
            // A VM that was off stays off; checks and waits take nothing back; finalize is
            // the last step (nothing after it can fail).
            ReinstallStep::StopVm
            | ReinstallStep::ValidateTemplate
            | ReinstallStep::WaitForGuestAgent
            | ReinstallStep::VerifyConnectivity
            | ReinstallStep::Finalize => Ok(()),
        }
    }
}

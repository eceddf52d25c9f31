//! Startup: finish or unwind what a previous run of the agent left unfinished, and compare
//! the store with libvirt.

use uuid::Uuid;

use super::create::CreateOp;
use super::delete::DeleteOp;
use super::{VmError, VmManager};
use crate::errors::ErrorCode;
use crate::store;

/// What startup found when it compared the store with libvirt.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Reconciliation {
    /// Tasks resumed (create, delete).
    pub resumed: Vec<Uuid>,
    /// Tasks marked failed because they cannot be resumed safely (power actions).
    pub abandoned: Vec<Uuid>,
    /// hvnode-managed domains with no record in the store.
    pub unknown_domains: Vec<Uuid>,
    /// Deployed VMs whose domain is gone from libvirt.
    pub missing_domains: Vec<Uuid>,
}

impl VmManager {
    /// Resumes unfinished tasks in the background and reports what the store and libvirt
    /// disagree on. Call once, before serving.
    pub async fn recover(&self) -> Result<Reconciliation, VmError> {
        let mut report = Reconciliation::default();
        for task in self.ctx.engine.unfinished().await? {
            let claim = match self.ctx.engine.claim(task.vps_id, task.id) {
                Ok(c) => c,
                Err(_) => {
                    // Two unfinished tasks on one VM cannot both be resumed; the older holds it.
                    self.ctx
                        .engine
                        .abandon(
                            task.id,
                            ErrorCode::TaskInProgress.as_str(),
                            "superseded at restart",
                        )
                        .await?;
                    report.abandoned.push(task.id);
                    continue;
                }
            };
            let ctx = self.ctx.clone();
            match task.kind.as_str() {
                "create" => {
                    tracing::info!(task = %task.id, vps = %task.vps_id, "resuming create");
                    report.resumed.push(task.id);
                    let op = CreateOp {
                        ctx: ctx.clone(),
                        id: task.vps_id,
                    };
                    tokio::spawn(async move {
                        let _ = ctx.engine.run(claim, "create", op).await;
                    });
                }
                "delete" => {
                    tracing::info!(task = %task.id, vps = %task.vps_id, "resuming delete");
                    report.resumed.push(task.id);
                    let op = DeleteOp {
                        ctx: ctx.clone(),
                        id: task.vps_id,
                    };
                    tokio::spawn(async move {
                        let _ = ctx.engine.run(claim, "delete", op).await;
                    });
                }
                kind => {
                    // A power action's caller is gone with the old process; its effect (or
                    // not) is visible in libvirt, and the control plane retries if needed.
                    tracing::warn!(task = %task.id, kind, "abandoning interrupted task");
                    drop(claim);
                    self.ctx
                        .engine
                        .abandon(
                            task.id,
                            ErrorCode::InvalidState.as_str(),
                            "interrupted by an agent restart; retry the action",
                        )
                        .await?;
                    report.abandoned.push(task.id);
                }
            }
        }
        self.compare_with_libvirt(&mut report).await?;
        Ok(report)
    }

    async fn compare_with_libvirt(&self, report: &mut Reconciliation) -> Result<(), VmError> {
        let domains = match self.ctx.hv.list_domains().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "libvirt unavailable; reconciliation skipped");
                return Ok(());
            }
        };
        let vms = self.ctx.store.call(|c| store::vms::list(c)).await?;
        for d in domains.iter().filter(|d| d.managed) {
            if !vms.iter().any(|v| v.id == d.id) {
                tracing::warn!(domain = %d.name, id = %d.id,
                    "libvirt has an hvnode domain the store does not know");
                report.unknown_domains.push(d.id);
            }
        }
        for vm in vms.iter().filter(|v| v.state == store::VmRowState::Active) {
            if !domains.iter().any(|d| d.id == vm.id) {
                tracing::warn!(vps = %vm.id, "deployed VPS has no domain in libvirt");
                report.missing_domains.push(vm.id);
            }
        }
        Ok(())
    }
}

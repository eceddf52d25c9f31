//! Startup: finish or unwind what a previous run of the agent left unfinished, and compare
//! the store with libvirt.

use uuid::Uuid;

use super::{create, delete, net, reinstall, resize, Op, Resume, TaskKind, VmError, VmManager};
use crate::errors::ErrorCode;
use crate::store;

/// What startup found when it compared the store with libvirt.
#[derive(Debug, Default, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Reconciliation {
    /// Tasks resumed (create, delete, reinstall, resize, snapshots, addresses, private
    /// networks).
    pub resumed: Vec<Uuid>,
    /// Tasks marked failed because they cannot be resumed safely (power actions).
    pub abandoned: Vec<Uuid>,
    /// hvnode-managed domains with no record in the store.
    pub unknown_domains: Vec<Uuid>,
    /// Deployed VMs whose domain is gone from libvirt.
    pub missing_domains: Vec<Uuid>,
    /// VMs found off that should run (a host reboot), started by `autostart` tasks,
    /// `boot.parallel` at a time.
    pub autostart: Vec<Uuid>,
    /// What the `reconcile` settings removed of the above.
    pub removed: Vec<Uuid>,
    /// What re-applying the network from the store did.
    #[schema(required = true)]
    pub network: Option<crate::network::Applied>,
    #[schema(required = true)]
    pub network_error: Option<String>,
}

impl VmManager {
    /// Resumes unfinished tasks in the background and reports what the store and libvirt
    /// disagree on. Call once, before serving.
    pub async fn recover(&self) -> Result<Reconciliation, VmError> {
        let mut report = Reconciliation::default();
        for task in self.ctx.engine.unfinished().await? {
            let Some(kind) = TaskKind::parse(&task.kind) else {
                let why = format!("{} is not a kind of task this version knows", task.kind);
                self.abandon_unreadable(&task, &why, &mut report).await?;
                continue;
            };
            let claim = match self.ctx.engine.claim(task.vps_id, task.id, kind.as_str()) {
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
            let (ctx, id) = (&self.ctx, task.vps_id);
            let resume = match kind {
                TaskKind::Create => create::CreateOp::resume(ctx, &task),
                TaskKind::Delete => delete::DeleteOp::resume(ctx, &task),
                TaskKind::Reinstall => reinstall::ReinstallOp::resume(ctx, &task),
                TaskKind::Resize => resize::ResizeOp::resume(ctx, &task),
                // An interrupted snapshot is finished from the step it reached; rollbacks
                // and deletes are repeated, each step being idempotent.
                TaskKind::SnapshotCreate
                | TaskKind::SnapshotRollback
                | TaskKind::SnapshotDelete => super::snapshots::resume(ctx, &task),
                TaskKind::IpAdd | TaskKind::IpRemove | TaskKind::IpMove => {
                    super::ips::resume(ctx, kind, &task)
                }
                TaskKind::NetAttach | TaskKind::NetDetach => {
                    super::private_nics::resume(ctx, kind, &task).await
                }
                // A power action's caller is gone with the old process; its effect (or
                // not) is visible in libvirt, and the control plane retries if needed.
                TaskKind::Start
                | TaskKind::Stop
                | TaskKind::Restart
                | TaskKind::Reset
                | TaskKind::Suspend
                | TaskKind::Resume => Resume::Interrupted,
                // The keeper starts the VM again if it still should run.
                TaskKind::Autostart | TaskKind::Autorestart => Resume::Interrupted,
            };
            match resume {
                Resume::Run(launch) => {
                    tracing::info!(task = %task.id, vps = %id, "resuming {kind}");
                    report.resumed.push(task.id);
                    launch(claim);
                }
                Resume::Done => {
                    // Only the filters were left; the network reconciliation below
                    // rebuilds them from the store.
                    drop(claim);
                    self.ctx.engine.complete_recovered(task.id).await?;
                    report.resumed.push(task.id);
                }
                Resume::Unreadable(why) => {
                    drop(claim);
                    self.abandon_unreadable(&task, &why, &mut report).await?;
                }
                Resume::Interrupted => {
                    tracing::warn!(task = %task.id, %kind, "abandoning interrupted task");
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
        // After a host reboot nothing is configured: bridges, tunnels, limits and filters
        // come back from the store, and leftovers of deleted VMs go.
        match net::reconcile(&self.ctx).await {
            Ok(applied) => {
                for e in &applied.errors {
                    tracing::error!(error = %e, "network reconciliation: part not configured");
                }
                if !applied.errors.is_empty() {
                    report.network_error = Some(applied.errors.join("; "));
                }
                tracing::info!(?applied, "network reconciled");
                report.network = Some(applied);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reconcile the network");
                report.network_error = Some(e.to_string());
            }
        }
        // With the network back, the VMs that should run and are off (a host reboot):
        // started by the keeper, a few at a time, once the agent serves.
        match self.boot_plan().await {
            Ok(plan) => report.autostart = plan,
            Err(e) => tracing::error!(error = %e, "cannot tell which VMs to start"),
        }
        *self
            .ctx
            .reconciliation
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// A task whose recorded input this version cannot read: it is marked failed (and
    /// reported) rather than stopping the agent from starting.
    async fn abandon_unreadable(
        &self,
        task: &store::TaskRow,
        why: &str,
        report: &mut Reconciliation,
    ) -> Result<(), VmError> {
        tracing::error!(task = %task.id, kind = %task.kind, error = why,
            "cannot resume a task whose input is unreadable; marking it failed");
        self.ctx
            .engine
            .abandon(
                task.id,
                ErrorCode::InvalidState.as_str(),
                &format!("interrupted by an agent restart and cannot be resumed: {why}"),
            )
            .await?;
        report.resumed.retain(|t| *t != task.id);
        report.abandoned.push(task.id);
        Ok(())
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
        let policy = self.ctx.config.reconcile.clone();
        let ours = self.ctx.disks.vm_root().to_string_lossy().into_owned();
        for d in domains.iter().filter(|d| d.managed) {
            if vms.iter().any(|v| v.id == d.id) {
                continue;
            }
            // Only domains whose disks live in this agent's vm_dir are this agent's to remove.
            let xml = self.ctx.hv.domain_xml(d.id).await.unwrap_or_default();
            let in_our_dir = xml.contains(&format!("{ours}/{}/", d.id));
            tracing::warn!(domain = %d.name, id = %d.id, in_our_dir,
                "libvirt has an hvnode domain the store does not know");
            report.unknown_domains.push(d.id);
            if policy.remove_unknown_domains && in_our_dir {
                tracing::warn!(id = %d.id, "removing unknown domain (reconcile.remove_unknown_domains)");
                let removed = async {
                    super::domain::remove_domain(&self.ctx, d.id, Op::Delete).await?;
                    self.ctx
                        .disks
                        .remove_all(d.id)
                        .await
                        .map_err(|e| VmError::storage(Op::Delete, e))
                }
                .await;
                match removed {
                    Ok(()) => report.removed.push(d.id),
                    // Reported, not fatal: the agent must come up to serve the others.
                    Err(e) => {
                        tracing::error!(id = %d.id, error = %e, "cannot remove unknown domain")
                    }
                }
            }
        }
        for vm in vms.iter().filter(|v| v.state == store::VmRowState::Active) {
            if domains.iter().any(|d| d.id == vm.id) {
                continue;
            }
            tracing::warn!(vps = %vm.id, "deployed VPS has no domain in libvirt");
            report.missing_domains.push(vm.id);
            if policy.remove_orphan_records {
                tracing::warn!(vps = %vm.id, "removing orphan record (reconcile.remove_orphan_records)");
                let id = vm.id;
                match self.ctx.disks.remove_all(id).await {
                    Ok(()) => {
                        self.ctx
                            .store
                            .call(move |c| store::vms::delete(c, id))
                            .await?;
                        report.removed.push(id);
                    }
                    Err(e) => {
                        tracing::error!(vps = %id, error = %e, "cannot remove orphan record's files")
                    }
                }
            }
        }
        Ok(())
    }
}

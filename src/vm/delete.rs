//! Deleting a VM: domain, disks, seed, NVRAM, addresses and record, in that order.
//!
//! A delete never rolls back: each step is idempotent, so a delete that failed halfway (or
//! was interrupted by a restart) is finished by running it again.

use std::sync::Arc;

use uuid::Uuid;

use super::model::Deleted;
use super::state::{on_busy, OnBusy};
use super::{domain::remove_domain, net, Ctx, Op, Resume, TaskKind, VmError, VmManager};
use crate::store;
use crate::tasks::{Operation, StepCtx};

/// How long a delete waits for a cancelled deployment to unwind.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

crate::steps! {
    /// The delete task's steps, by the names the journal stores.
    pub(crate) enum DeleteStep {
        RemoveDomain = "remove_domain",
        RemoveNetwork = "remove_network",
        RemoveDisks = "remove_disks",
        ReleaseIps = "release_ips",
        RemoveRecord = "remove_record",
    }
}

pub(crate) const DELETE_STEPS: &[DeleteStep] = &[
    DeleteStep::RemoveDomain,
    DeleteStep::RemoveNetwork,
    DeleteStep::RemoveDisks,
    DeleteStep::ReleaseIps,
    DeleteStep::RemoveRecord,
];

impl VmManager {
    pub async fn delete(&self, id: Uuid) -> Result<Deleted, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        let claim = match ctx.claim(id, TaskKind::Delete) {
            Ok(c) => c,
            // Deleting a VM that is still deploying cancels the deployment: it unwinds what
            // it did, then the delete removes the rest.
            Err(busy)
                if ctx.engine.holder(id).is_some_and(|h| {
                    TaskKind::parse(h.kind).map(|k| on_busy(k, TaskKind::Delete))
                        == Some(OnBusy::CancelHolder)
                }) =>
            {
                tracing::info!(vps = %id, "delete cancels the deployment in progress");
                ctx.engine.cancel(id);
                if !ctx.engine.wait_released(id, CANCEL_WAIT).await {
                    return Err(busy);
                }
                ctx.claim(id, TaskKind::Delete)?
            }
            Err(busy) => return Err(busy),
        };
        ctx.record_task(
            &claim,
            TaskKind::Delete,
            DELETE_STEPS,
            serde_json::json!({}),
        )
        .await?;
        tracing::info!(vps = %id, "delete");
        let op = DeleteOp {
            ctx: self.ctx.clone(),
            id,
        };
        ctx.engine.run(claim, TaskKind::Delete.as_str(), op).await?;
        Ok(Deleted {
            deleted: true,
            vps_id: id,
            name: vm.hostname,
        })
    }
}

pub(crate) struct DeleteOp {
    pub ctx: Arc<Ctx>,
    pub id: Uuid,
}

impl DeleteOp {
    /// The task found unfinished at startup: every step is idempotent, so it runs again.
    pub(crate) fn resume(ctx: &Arc<Ctx>, task: &store::TaskRow) -> Resume {
        Resume::run(
            ctx,
            TaskKind::Delete,
            DeleteOp {
                ctx: ctx.clone(),
                id: task.vps_id,
            },
        )
    }
}

impl Operation for DeleteOp {
    type Error = VmError;
    type Step = DeleteStep;

    fn steps(&self) -> &'static [Self::Step] {
        DELETE_STEPS
    }

    fn rolls_back(&self) -> bool {
        false
    }

    /// A delete goes forward, never back: every step can be repeated until it is done.
    async fn undo_step(&self, _step: DeleteStep) -> Result<(), VmError> {
        Ok(())
    }

    fn uses_slot(&self) -> bool {
        false
    }

    async fn run_step(&self, step: DeleteStep, _ctx: &StepCtx) -> Result<(), VmError> {
        let (ctx, id) = (&self.ctx, self.id);
        match step {
            DeleteStep::RemoveDomain => remove_domain(ctx, id, Op::Delete).await,
            DeleteStep::RemoveNetwork => {
                if let Ok(vm) = ctx.vm(id).await {
                    for nic in net::load(ctx, &vm).await?.all() {
                        ctx.net.remove_nic(&nic).await.map_err(|e| {
                            VmError::host(Op::Delete, "a network device could not be removed", e)
                        })?;
                    }
                }
                net::refresh_filters(ctx, &[id], Op::Delete).await
            }
            DeleteStep::RemoveDisks => ctx
                .disks
                .remove_all(id)
                .await
                .map_err(|e| VmError::storage(Op::Delete, e)),
            DeleteStep::ReleaseIps => Ok(ctx
                .store
                .call(move |c| store::vms::release_ips(c, id))
                .await?),
            DeleteStep::RemoveRecord => {
                Ok(ctx.store.call(move |c| store::vms::delete(c, id)).await?)
            }
        }
    }
}

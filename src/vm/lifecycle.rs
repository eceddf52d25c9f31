//! Power actions: start, stop, restart, reset, suspend, resume.
//!
//! Each is a one-step task: the caller waits for it and gets the VM's status afterwards.
//! The state machine (`state::decide`) is consulted first, under the VM's claim, so an
//! action on a VM already where it leads succeeds without a task or a side effect.

use std::sync::Arc;

use uuid::Uuid;

use super::domain::{shutdown, start_domain, start_domain_paused, StopOptions};
use super::model::{ActionResult, VmStatus};
use super::state::{Action, Decision};
use super::{Ctx, Op, TaskKind, VmError, VmManager};
use crate::hypervisor::{HypervisorError, PowerState};
use crate::store::power::{Intended, StopReason};
use crate::store::{self, VmRowState};
use crate::tasks::{Operation, StepCtx};

const MAX_STOP_TIMEOUT_S: u64 = 3600;

impl VmManager {
    pub async fn action(
        &self,
        id: Uuid,
        action: Action,
        stop: StopOptions,
    ) -> Result<ActionResult, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        // A deploying or failed VM refuses every power action for what it is, whether or
        // not its create task still holds it.
        if vm.state != VmRowState::Active {
            super::admit(action.into(), VmStatus::derive(vm.state, None))?;
        }
        let claim = ctx.claim(id, action.into())?;
        let status = self.status_of(&vm).await;
        let decision = super::admit(action.into(), status)?;
        // What was asked is recorded first (durably, under the claim): the VM comes back
        // to it after a host reboot, and a stop is never mistaken for a crash.
        let (intended, reason) = intent(action);
        let reason = reason.filter(|_| decision != Decision::AlreadyThere);
        let now = crate::time::now();
        ctx.store
            .call(move |c| store::power::set_intended(c, id, intended, reason, &now))
            .await?;
        if decision == Decision::AlreadyThere {
            return Ok(result(&vm, status));
        }
        let stop = StopOptions {
            force: stop.force,
            timeout_s: stop.timeout_s.min(MAX_STOP_TIMEOUT_S),
        };
        let input = serde_json::json!({ "force": stop.force, "timeout_s": stop.timeout_s });
        ctx.record_task(&claim, action.into(), steps(action), input)
            .await?;
        tracing::info!(vps = %id, action = action.as_str(), "power action");
        let op = PowerOp {
            ctx: self.ctx.clone(),
            id,
            action,
            stop,
            paused: false,
        };
        ctx.engine.run(claim, action.as_str(), op).await?;
        let vm = ctx.vm(id).await?;
        let status = self.status_of(&vm).await;
        Ok(result(&vm, status))
    }
}

impl VmManager {
    /// The agent's own start of a VM that should run and does not (`kind`: `Autostart` at
    /// the agent's start, `Autorestart` after its QEMU died), as a task like any other:
    /// it shows in `/v1/tasks`, and nothing else runs on the VM meanwhile. A VM meant to be
    /// paused comes back paused, before its first instruction (a resume boots it).
    /// `Ok(false)`: nothing to do (busy, no longer deployed, or already running).
    pub(crate) async fn come_back(
        &self,
        id: Uuid,
        kind: TaskKind,
        paused: bool,
        reason: StopReason,
    ) -> Result<bool, VmError> {
        let ctx = &self.ctx;
        let vm = ctx.vm(id).await?;
        if vm.state != VmRowState::Active {
            return Ok(false);
        }
        let Ok(claim) = ctx.claim(id, kind) else {
            return Ok(false);
        };
        let status = self.status_of(&vm).await;
        if super::admit(kind, status)? == Decision::AlreadyThere {
            return Ok(false);
        }
        let input = serde_json::json!({ "paused": paused, "reason": reason.as_str() });
        ctx.record_task(&claim, kind, &[PowerStep::StartVm], input)
            .await?;
        tracing::info!(vps = %id, %kind, paused, reason = reason.as_str(), "starting a VM that should run");
        let op = PowerOp {
            ctx: self.ctx.clone(),
            id,
            action: Action::Start,
            stop: StopOptions::default(),
            paused,
        };
        ctx.engine.run(claim, kind.as_str(), op).await?;
        Ok(true)
    }
}

fn result(vm: &crate::store::VmRow, status: VmStatus) -> ActionResult {
    ActionResult {
        id: vm.id,
        name: vm.hostname.clone(),
        status,
        ip_address: vm.ip_address,
    }
}

/// The state each action asks for, and the stop reason it records.
fn intent(action: Action) -> (Intended, Option<StopReason>) {
    match action {
        Action::Start | Action::Restart | Action::Reset | Action::Resume => {
            (Intended::Running, None)
        }
        Action::Stop => (Intended::Stopped, Some(StopReason::Requested)),
        Action::Suspend => (Intended::Paused, None),
    }
}

fn steps(action: Action) -> &'static [PowerStep] {
    match action {
        Action::Start => &[PowerStep::StartVm],
        Action::Stop => &[PowerStep::StopVm],
        Action::Restart => &[PowerStep::StopVm, PowerStep::StartVm],
        Action::Reset => &[PowerStep::ResetVm],
        Action::Suspend => &[PowerStep::SuspendVm],
        Action::Resume => &[PowerStep::ResumeVm],
    }
}

struct PowerOp {
    ctx: Arc<Ctx>,
    id: Uuid,
    action: Action,
    stop: StopOptions,
    /// Start paused (a VM meant to be paused, coming back).
    paused: bool,
}

impl PowerOp {
    fn hv(&self, e: HypervisorError) -> VmError {
        VmError::hypervisor(Op::Action(self.action), e)
    }

    async fn power(&self) -> Result<Option<PowerState>, VmError> {
        self.ctx
            .hv
            .power_state(self.id)
            .await
            .map_err(|e| self.hv(e))
    }

    /// ACPI shutdown, then power-off when the guest has not finished within the timeout.
    async fn stop_vm(&self) -> Result<(), VmError> {
        shutdown(&self.ctx, self.id, Op::Action(self.action), self.stop).await
    }

    async fn expect(&self, want: PowerState) -> Result<(), VmError> {
        match self.power().await? {
            Some(s) if s == want => Ok(()),
            other => Err(VmError::Failed {
                op: Op::Action(self.action),
                message: format!("domain is {other:?}, expected {want:?}"),
            }),
        }
    }
}

crate::steps! {
    /// The power actions' steps, by the names the journal stores.
    pub(crate) enum PowerStep {
        StartVm = "start_vm",
        StopVm = "stop_vm",
        ResetVm = "reset_vm",
        SuspendVm = "suspend_vm",
        ResumeVm = "resume_vm",
    }
}

impl Operation for PowerOp {
    type Error = VmError;
    type Step = PowerStep;

    fn steps(&self) -> &'static [Self::Step] {
        steps(self.action)
    }

    fn rolls_back(&self) -> bool {
        false
    }

    /// A power action is not undone: its effect (or not) is what libvirt shows.
    async fn undo_step(&self, _step: PowerStep) -> Result<(), VmError> {
        Ok(())
    }

    fn uses_slot(&self) -> bool {
        false
    }

    async fn run_step(&self, step: PowerStep, _ctx: &StepCtx) -> Result<(), VmError> {
        let hv = &self.ctx.hv;
        match step {
            PowerStep::StartVm if self.paused => {
                let vm = self.ctx.vm(self.id).await?;
                start_domain_paused(&self.ctx, &vm, Op::Action(self.action)).await?;
                self.expect(PowerState::Paused).await
            }
            PowerStep::StartVm => {
                let vm = self.ctx.vm(self.id).await?;
                start_domain(&self.ctx, &vm, Op::Action(self.action)).await?;
                self.expect(PowerState::Running).await
            }
            PowerStep::StopVm => self.stop_vm().await,
            PowerStep::ResetVm => hv.reset(self.id).await.map_err(|e| self.hv(e)),
            PowerStep::SuspendVm => {
                hv.suspend(self.id).await.map_err(|e| self.hv(e))?;
                self.expect(PowerState::Paused).await
            }
            PowerStep::ResumeVm => {
                hv.resume(self.id).await.map_err(|e| self.hv(e))?;
                self.expect(PowerState::Running).await
            }
        }
    }
}

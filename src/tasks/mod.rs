//! The task engine: every long action on a VM is a durable task of named steps.
//!
//! How a task runs:
//! 1. The caller `claim`s the VM. A VM has at most one claim at a time (one writer per VM);
//!    a second claim is refused with the task holding it, which the API reports as
//!    `TASK_IN_PROGRESS`. Claims are in memory: a restarted agent starts with none.
//! 2. The caller records the task and its steps in the store (usually in the same
//!    transaction as the change that motivated it), then hands the claim and an `Operation`
//!    to `TaskEngine::run`.
//! 3. `run` waits for one of `tasks.max_concurrent` slots (provisioning only; short actions
//!    skip the queue), then executes the steps in order.
//!    Each step's start and end is committed before the next begins, so after a crash the
//!    journal says exactly which steps finished.
//! 4. If a step fails (or the task is cancelled), the error is committed first, then the
//!    steps are undone in reverse, starting with the failed one (undo must tolerate a step
//!    that only half happened). Operations that have nothing to undo say so.
//! 5. `Operation::finish` runs with the outcome to settle the VM's record, and only then is
//!    the task's final state committed.
//!
//! After a crash the owner of each kind of operation rebuilds the operations of unfinished
//! tasks from their input and the VM record and calls `run` again. A task without a recorded
//! error continues: completed steps are skipped, a step recorded as running is executed
//! again (every step is idempotent). A task with a recorded error was unwinding: the undo is
//! run again from its failed step (every undo is idempotent). `finish` may therefore run
//! more than once and must be idempotent too.
//!
//! ```text
//!   pending ──▶ running ──▶ completed
//!                  │ step fails            │ cancel()
//!                  ▼                       ▼
//!          (error recorded, undo) ──▶ failed | cancelled
//! ```

pub mod faults;
pub mod webhooks;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{self, StepState, Store, TaskRow, TaskState};

/// An error a step can fail with: it carries the contract's error code for the task record.
pub trait TaskFailure: std::error::Error + Send + Sync + Sized + 'static {
    fn code(&self) -> &'static str;
    /// What the journal keeps and the task's documents and webhooks show: safe for a
    /// customer to read. The full error (`Display`) goes to the log.
    fn public_message(&self) -> String {
        self.to_string()
    }
    /// Wraps a failure of the engine itself (its store), so it reaches the caller typed.
    fn from_engine(err: store::StoreError) -> Self;
    /// The error of a task stopped by `TaskEngine::cancel`.
    fn cancelled() -> Self;
    fn is_cancelled(&self) -> bool;
    /// An error read back from the journal (a task that was unwinding when the agent died).
    fn from_record(code: &str, message: &str) -> Self;
    /// The same error as the failure of a task of `kind`, which decides its code (a step
    /// shared by several operations fails each as itself).
    fn in_task(self, _kind: &str) -> Self {
        self
    }
}

/// What a step may consult while it runs.
#[derive(Clone)]
pub struct StepCtx {
    /// Fires when the task is cancelled; long waits must stop on it.
    pub cancel: CancellationToken,
}

/// One step of an operation. Its name is what the journal stores (and fault points and
/// logs say), so a name once written is never changed.
pub trait Step: Copy + std::fmt::Debug + Send + Sync + 'static {
    fn name(self) -> &'static str;
}

/// Declares an operation's steps: an enum, its names in the journal, and `ALL` in order.
#[macro_export]
macro_rules! steps {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(clippy::enum_variant_names)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
        }

        impl $crate::tasks::Step for $name {
            fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }
    };
}

/// Steps of a family of tasks that share one operation (adding, removing and moving an
/// address): each member is a `steps!` enum of its own, the family enum wraps them, and
/// `LIST` is the member's steps in order, as the family's.
///
/// ```ignore
/// crate::step_family! {
///     pub(crate) enum IpStep {
///         /// Adding an address.
///         Add(AddStep) in ADD_STEPS { AllocateIp = "allocate_ip", UpdateFilter = "update_filter" },
///         …
///     }
/// }
/// ```
#[macro_export]
macro_rules! step_family {
    ($(#[$meta:meta])* $vis:vis enum $family:ident {
        $($(#[$mmeta:meta])* $member:ident($inner:ident) in $list:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal),* $(,)?
        }),* $(,)?
    }) => {
        $(
            $crate::steps! {
                $(#[$mmeta])*
                $vis enum $inner {
                    $($(#[$vmeta])* $variant = $text,)*
                }
            }

            $vis const $list: &[$family] = &[$($family::$member($inner::$variant),)*];
        )*

        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $family {
            $($member($inner),)*
        }

        impl $crate::tasks::Step for $family {
            fn name(self) -> &'static str {
                match self {
                    $($family::$member(s) => $crate::tasks::Step::name(s),)*
                }
            }
        }
    };
}

/// A long action as a sequence of named, idempotent steps, each with an undo.
///
/// `run_step` and `undo_step` match on `Self::Step` exhaustively: a new step does not
/// compile until it says how it runs and how it is undone.
pub trait Operation: Send + Sync + 'static {
    type Error: TaskFailure;
    type Step: Step;

    fn steps(&self) -> &'static [Self::Step];
    fn run_step(
        &self,
        step: Self::Step,
        ctx: &StepCtx,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Undoes `step`, which may have completed or failed halfway. Must be idempotent.
    fn undo_step(&self, step: Self::Step) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Whether a failure unwinds the completed steps.
    fn rolls_back(&self) -> bool {
        true
    }
    /// Whether the task counts against `tasks.max_concurrent`. Provisioning (clones,
    /// boots, long waits for the guest) does; short actions such as a power change or a
    /// delete do not, so they never wait behind deployments of other VMs.
    fn uses_slot(&self) -> bool {
        true
    }
    /// Runs after the last step or the unwinding, with the outcome, before the task's final
    /// state is committed. Must be idempotent.
    fn finish(&self, _outcome: Result<(), &Self::Error>) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The journal names of `steps`, in order.
pub fn step_names<S: Step>(steps: &[S]) -> Vec<&'static str> {
    steps.iter().map(|s| s.name()).collect()
}

#[derive(Debug, Clone)]
struct Holder {
    task: Uuid,
    kind: &'static str,
    cancel: CancellationToken,
}

type BusyMap = Arc<Mutex<HashMap<Uuid, Holder>>>;

/// The right to change one VM. Dropping it releases the VM.
pub struct Claim {
    vm: Uuid,
    task: Uuid,
    cancel: CancellationToken,
    busy: BusyMap,
}

impl Claim {
    pub fn vm(&self) -> Uuid {
        self.vm
    }

    pub fn task(&self) -> Uuid {
        self.task
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            if busy.get(&self.vm).map(|h| h.task) == Some(self.task) {
                busy.remove(&self.vm);
            }
        }
    }
}

/// A claim was refused: `task`, of `kind`, holds the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub task: Uuid,
    pub kind: &'static str,
}

/// Cheap to clone: clones share the journal, the claims and the slots.
#[derive(Clone)]
pub struct TaskEngine {
    store: Store,
    busy: BusyMap,
    slots: Arc<Semaphore>,
    faults: faults::FaultPoints,
}

impl TaskEngine {
    pub fn new(store: Store, max_concurrent: usize, faults: faults::FaultPoints) -> TaskEngine {
        TaskEngine {
            store,
            busy: Arc::default(),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            faults,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Claims `vm` for a new task `task` of `kind`.
    pub fn claim(&self, vm: Uuid, task: Uuid, kind: &'static str) -> Result<Claim, Busy> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = busy.get(&vm) {
            return Err(Busy {
                task: h.task,
                kind: h.kind,
            });
        }
        let cancel = CancellationToken::new();
        busy.insert(
            vm,
            Holder {
                task,
                kind,
                cancel: cancel.clone(),
            },
        );
        Ok(Claim {
            vm,
            task,
            cancel,
            busy: self.busy.clone(),
        })
    }

    /// The task currently holding `vm`, if any.
    pub fn holder(&self, vm: Uuid) -> Option<Busy> {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm)
            .map(|h| Busy {
                task: h.task,
                kind: h.kind,
            })
    }

    /// Asks the task holding `vm` to stop at its next step boundary (or out of a wait) and
    /// unwind. Returns the task that was asked.
    pub fn cancel(&self, vm: Uuid) -> Option<Uuid> {
        let busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.get(&vm).map(|h| {
            h.cancel.cancel();
            h.task
        })
    }

    /// Waits until no task holds `vm`, up to `timeout`.
    pub async fn wait_released(&self, vm: Uuid, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.holder(vm).is_some() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Tasks holding a claim right now.
    pub fn active(&self) -> usize {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Runs the task recorded under `claim.task()` to its end, continuing from its journal.
    /// Runs `op` under `claim` in the background: the task belongs to no request and no
    /// caller; its end is in the journal.
    pub fn launch<O: Operation>(&self, claim: Claim, kind: &'static str, op: O) {
        let engine = self.clone();
        tokio::spawn(async move {
            let _ = engine.run(claim, kind, op).await;
        });
    }

    pub async fn run<O: Operation>(&self, claim: Claim, kind: &str, op: O) -> Result<(), O::Error> {
        let task_id = claim.task();
        let ctx = StepCtx {
            cancel: claim.cancel.clone(),
        };
        let journal = Journal {
            store: &self.store,
            task: task_id,
        };
        let _permit = if op.uses_slot() {
            tokio::select! {
                p = self.slots.acquire() => p.ok(),
                _ = ctx.cancel.cancelled() => None,
            }
        } else {
            None
        };
        let outcome = self.execute(&journal, kind, &op, &ctx).await;
        op.finish(outcome.as_ref().map(|_| ())).await;
        let final_state = match &outcome {
            Ok(()) => journal.task_state(TaskState::Completed, None).await,
            Err(e) if e.is_cancelled() => journal.task_state(TaskState::Cancelled, None).await,
            Err(_) => journal.task_state(TaskState::Failed, None).await,
        };
        if let Err(e) = final_state {
            tracing::error!(task = %task_id, error = %e, "cannot record the task's end");
            if outcome.is_ok() {
                return Err(O::Error::from_engine(e));
            }
        }
        drop(claim);
        outcome
    }

    async fn execute<O: Operation>(
        &self,
        journal: &Journal<'_>,
        kind: &str,
        op: &O,
        ctx: &StepCtx,
    ) -> Result<(), O::Error> {
        let recorded = journal.load().await.map_err(O::Error::from_engine)?;
        let steps = op.steps();
        if let Some(task) = &recorded {
            if let (Some(code), Some(message)) = (&task.error_code, &task.error) {
                // The previous run died while unwinding: finish the unwinding.
                let failed = task
                    .steps
                    .iter()
                    .rposition(|s| matches!(s.state, StepState::Failed | StepState::Running))
                    .unwrap_or(0);
                tracing::warn!(task = %journal.task, kind, "resuming an interrupted unwind");
                let err = O::Error::from_record(code, message);
                if op.rolls_back() {
                    self.unwind(journal, kind, op, steps, failed).await;
                }
                return Err(err);
            }
        }
        journal
            .task_state(TaskState::Running, None)
            .await
            .map_err(O::Error::from_engine)?;
        for (i, &step) in steps.iter().enumerate() {
            let name = step.name();
            let completed = recorded
                .as_ref()
                .and_then(|t| t.steps.get(i))
                .is_some_and(|s| s.state == StepState::Completed);
            if completed {
                continue;
            }
            let result = if ctx.cancel.is_cancelled() {
                Err(O::Error::cancelled())
            } else {
                self.faults.hit(kind, name, faults::Moment::Before);
                journal
                    .step(i, StepState::Running, None)
                    .await
                    .map_err(O::Error::from_engine)?;
                op.run_step(step, ctx).await
            };
            match result {
                Ok(()) => {
                    journal
                        .step(i, StepState::Completed, None)
                        .await
                        .map_err(O::Error::from_engine)?;
                    self.faults.hit(kind, name, faults::Moment::After);
                }
                Err(err) => {
                    let err = err.in_task(kind);
                    let message = err.public_message();
                    if err.is_cancelled() {
                        tracing::info!(task = %journal.task, kind, step = name, "task cancelled");
                    } else {
                        tracing::warn!(task = %journal.task, kind, step = name,
                            error = %crate::errors::chain(&err), "task step failed");
                    }
                    // The error is committed before anything is undone, so a crash during
                    // the unwinding resumes the unwinding. Journal failures from here on
                    // are logged: the step's error is what the caller must see.
                    log_store(journal.step(i, StepState::Failed, Some(&message)).await);
                    log_store(journal.task_error(err.code(), &message).await);
                    if op.rolls_back() {
                        self.unwind(journal, kind, op, steps, i).await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Undoes steps `failed` down to 0.
    async fn unwind<O: Operation>(
        &self,
        journal: &Journal<'_>,
        kind: &str,
        op: &O,
        steps: &'static [O::Step],
        failed: usize,
    ) {
        for i in (0..=failed.min(steps.len().saturating_sub(1))).rev() {
            let step = steps[i];
            let name = step.name();
            self.faults.hit(kind, name, faults::Moment::Undo);
            match op.undo_step(step).await {
                Ok(()) => {
                    if i != failed {
                        log_store(journal.step(i, StepState::RolledBack, None).await);
                    }
                }
                Err(e) => {
                    tracing::error!(task = %journal.task, step = name,
                        error = %crate::errors::chain(&e), "undo failed");
                    log_store(
                        journal
                            .step(i, StepState::Failed, Some(&format!("undo failed: {e}")))
                            .await,
                    );
                }
            }
        }
    }

    /// Tasks a previous run left unfinished.
    pub async fn unfinished(&self) -> store::Result<Vec<TaskRow>> {
        self.store.call(|c| store::tasks::unfinished(c)).await
    }

    /// Marks an interrupted task whose remaining steps the startup reconciliation did as
    /// completed.
    pub async fn complete_recovered(&self, task: Uuid) -> store::Result<()> {
        let now = crate::time::now();
        self.store
            .call(move |c| store::tasks::set_state(c, task, TaskState::Completed, None, &now))
            .await
    }

    /// Marks a task that cannot be resumed as failed.
    pub async fn abandon(&self, task: Uuid, code: &str, message: &str) -> store::Result<()> {
        let (code, message, now) = (code.to_owned(), message.to_owned(), crate::time::now());
        self.store
            .call(move |c| {
                store::tasks::set_state(c, task, TaskState::Failed, Some((&code, &message)), &now)
            })
            .await
    }
}

fn log_store(result: store::Result<()>) {
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot write task journal");
    }
}

/// Writes one task's journal entries.
struct Journal<'a> {
    store: &'a Store,
    task: Uuid,
}

impl Journal<'_> {
    async fn load(&self) -> store::Result<Option<TaskRow>> {
        let id = self.task;
        self.store.call(move |c| store::tasks::get(c, id)).await
    }

    async fn task_state(&self, state: TaskState, error: Option<(&str, &str)>) -> store::Result<()> {
        let (id, now) = (self.task, crate::time::now());
        let error = error.map(|(c, m)| (c.to_owned(), m.to_owned()));
        self.store
            .call(move |c| {
                store::tasks::set_state(
                    c,
                    id,
                    state,
                    error.as_ref().map(|(c, m)| (c.as_str(), m.as_str())),
                    &now,
                )
            })
            .await
    }

    /// Records the task's error while it is still running (before unwinding).
    async fn task_error(&self, code: &str, message: &str) -> store::Result<()> {
        self.task_state(TaskState::Running, Some((code, message)))
            .await
    }

    async fn step(&self, index: usize, state: StepState, error: Option<&str>) -> store::Result<()> {
        let (id, now, error) = (self.task, crate::time::now(), error.map(str::to_owned));
        self.store
            .call(move |c| {
                store::tasks::set_step(c, id, index as u32, state, error.as_deref(), &now)
            })
            .await
    }
}

#[cfg(test)]
mod tests;

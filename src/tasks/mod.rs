//! The task engine: every long action on a VM is a durable task of named steps.
//!
//! How a task runs:
//! 1. The caller `claim`s the VM. A VM has at most one claim at a time (one writer per VM);
//!    a second claim is refused with the id of the task holding it, which the API reports as
//!    `TASK_IN_PROGRESS`. Claims are in memory: a restarted agent starts with none.
//! 2. The caller records the task and its steps in the store (usually in the same
//!    transaction as the change that motivated it), then hands the claim and an `Operation`
//!    to `TaskEngine::run`.
//! 3. `run` waits for one of `tasks.max_concurrent` slots, then executes the steps in order.
//!    Each step's start and end is committed before the next begins, so after a crash the
//!    journal says exactly which steps finished.
//! 4. If a step fails, the steps are undone in reverse, starting with the failed one (undo
//!    must tolerate a step that only half happened), and the task is marked failed with the
//!    step's error code. Operations that have nothing to undo say so.
//! 5. `Operation::finish` runs last, with the outcome, to settle the VM's record.
//!
//! On startup, the owner of each kind of operation rebuilds the operations of unfinished
//! tasks from their input and the VM record and calls `run` again; steps recorded as
//! completed are skipped, a step recorded as running is executed again (every step is
//! idempotent).
//!
//! ```text
//!   pending ──▶ running ──▶ completed
//!                  │
//!                  └──▶ failed (steps undone) ; cancelled (never started)
//! ```

pub mod faults;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::store::{self, StepState, Store, TaskRow, TaskState};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error a step can fail with: it carries the contract's error code for the task record.
pub trait TaskFailure: std::error::Error + Send + Sync + 'static {
    fn code(&self) -> &'static str;
    /// Wraps a failure of the engine itself (its store), so it reaches the caller typed.
    fn from_engine(err: store::StoreError) -> Self;
}

/// A long action as a sequence of named, idempotent steps, each with an undo.
pub trait Operation: Send + Sync + 'static {
    type Error: TaskFailure;

    fn steps(&self) -> &'static [&'static str];
    fn run_step<'a>(&'a self, step: &'static str) -> BoxFuture<'a, Result<(), Self::Error>>;
    /// Undoes `step`, which may have completed or failed halfway. Must be idempotent.
    fn undo_step<'a>(&'a self, _step: &'static str) -> BoxFuture<'a, Result<(), Self::Error>> {
        Box::pin(async { Ok(()) })
    }
    /// Whether a failure unwinds the completed steps.
    fn rolls_back(&self) -> bool {
        true
    }
    /// Runs once after the last step or the unwinding, with the outcome.
    fn finish<'a>(&'a self, _outcome: Result<(), &'a Self::Error>) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The right to change one VM. Dropping it releases the VM.
pub struct Claim {
    vm: Uuid,
    task: Uuid,
    busy: Arc<Mutex<HashMap<Uuid, Uuid>>>,
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
            if busy.get(&self.vm) == Some(&self.task) {
                busy.remove(&self.vm);
            }
        }
    }
}

/// A claim was refused: `task` holds the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub task: Uuid,
}

pub struct TaskEngine {
    store: Store,
    busy: Arc<Mutex<HashMap<Uuid, Uuid>>>,
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

    /// Claims `vm` for a new task `task`.
    pub fn claim(&self, vm: Uuid, task: Uuid) -> Result<Claim, Busy> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holder) = busy.get(&vm) {
            return Err(Busy { task: *holder });
        }
        busy.insert(vm, task);
        Ok(Claim {
            vm,
            task,
            busy: self.busy.clone(),
        })
    }

    /// The task currently holding `vm`, if any.
    pub fn holder(&self, vm: Uuid) -> Option<Uuid> {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm)
            .copied()
    }

    /// Runs the task recorded under `claim.task()` to its end, skipping steps the journal
    /// already shows completed.
    pub async fn run<O: Operation>(&self, claim: Claim, kind: &str, op: O) -> Result<(), O::Error> {
        let task_id = claim.task();
        let _permit = self.slots.acquire().await.ok();
        let result = self.execute(task_id, kind, &op).await;
        op.finish(result.as_ref().map(|_| ())).await;
        drop(claim);
        result
    }

    async fn execute<O: Operation>(
        &self,
        task_id: Uuid,
        kind: &str,
        op: &O,
    ) -> Result<(), O::Error> {
        let journal = Journal {
            store: &self.store,
            task: task_id,
        };
        let done = journal.load().await.map_err(O::Error::from_engine)?;
        journal
            .task_state(TaskState::Running, None)
            .await
            .map_err(O::Error::from_engine)?;
        let steps = op.steps();
        for (i, step) in steps.iter().enumerate() {
            if done
                .as_ref()
                .is_some_and(|t| t.steps.get(i).map(|s| s.state) == Some(StepState::Completed))
            {
                continue;
            }
            self.faults.hit(kind, step, faults::Moment::Before);
            journal
                .step(i, StepState::Running, None)
                .await
                .map_err(O::Error::from_engine)?;
            match op.run_step(step).await {
                Ok(()) => {
                    journal
                        .step(i, StepState::Completed, None)
                        .await
                        .map_err(O::Error::from_engine)?;
                    self.faults.hit(kind, step, faults::Moment::After);
                }
                Err(err) => {
                    tracing::warn!(task = %task_id, kind, step, error = %err, "task step failed");
                    let message = err.to_string();
                    // Journal failures from here on are logged, not returned: the step's
                    // error is what the caller must see.
                    log_store(journal.step(i, StepState::Failed, Some(&message)).await);
                    if op.rolls_back() {
                        self.unwind(&journal, op, steps, i).await;
                    }
                    log_store(
                        journal
                            .task_state(TaskState::Failed, Some((err.code(), &message)))
                            .await,
                    );
                    return Err(err);
                }
            }
        }
        journal
            .task_state(TaskState::Completed, None)
            .await
            .map_err(O::Error::from_engine)?;
        Ok(())
    }

    /// Undoes steps `failed` down to 0.
    async fn unwind<O: Operation>(
        &self,
        journal: &Journal<'_>,
        op: &O,
        steps: &'static [&'static str],
        failed: usize,
    ) {
        for i in (0..=failed).rev() {
            let step = steps[i];
            match op.undo_step(step).await {
                Ok(()) => {
                    if i != failed {
                        log_store(journal.step(i, StepState::RolledBack, None).await);
                    }
                }
                Err(e) => {
                    tracing::error!(task = %journal.task, step, error = %e, "undo failed");
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

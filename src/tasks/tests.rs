//! The engine's journaling, undo and claims, with operations made of recorded closures.

use std::sync::Mutex as StdMutex;

use super::*;
use crate::store::NewTask;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TestError(String);

impl TaskFailure for TestError {
    fn code(&self) -> &'static str {
        "TEST_FAILED"
    }
    fn from_engine(err: store::StoreError) -> Self {
        TestError(err.to_string())
    }
    fn cancelled() -> Self {
        TestError("cancelled".into())
    }
    fn is_cancelled(&self) -> bool {
        self.0 == "cancelled"
    }
    fn from_record(_code: &str, message: &str) -> Self {
        TestError(message.to_owned())
    }
}

crate::steps! {
    enum TestStep {
        One = "one",
        Two = "two",
        Three = "three",
    }
}

/// Records every call; fails the step named in `fail_at`.
struct Recorder {
    log: Arc<StdMutex<Vec<String>>>,
    fail_at: Option<&'static str>,
    /// Waits here until cancelled.
    block_at: Option<&'static str>,
}

fn recorder(log: &Arc<StdMutex<Vec<String>>>, fail_at: Option<&'static str>) -> Recorder {
    Recorder {
        log: log.clone(),
        fail_at,
        block_at: None,
    }
}

impl Operation for Recorder {
    type Error = TestError;
    type Step = TestStep;

    fn steps(&self) -> &'static [TestStep] {
        TestStep::ALL
    }

    async fn run_step(&self, step: TestStep, ctx: &StepCtx) -> Result<(), TestError> {
        let step = step.name();
        self.log.lock().unwrap().push(format!("run {step}"));
        if self.fail_at == Some(step) {
            return Err(TestError(format!("{step} broke")));
        }
        if self.block_at == Some(step) {
            ctx.cancel.cancelled().await;
            return Err(TestError::cancelled());
        }
        Ok(())
    }

    async fn undo_step(&self, step: TestStep) -> Result<(), TestError> {
        let step = step.name();
        self.log.lock().unwrap().push(format!("undo {step}"));
        Ok(())
    }
}

fn engine() -> (TaskEngine, Store) {
    let store = crate::store::test_store();
    (
        TaskEngine::new(store.clone(), 2, faults::FaultPoints::none()),
        store,
    )
}

fn record(store: &Store, vm: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    store
        .call_sync(|c| {
            store::tasks::insert(
                c,
                &NewTask {
                    id,
                    kind: "test",
                    vps_id: vm,
                    input: serde_json::json!({}),
                    steps: &["one", "two", "three"],
                    now: "t0",
                },
            )
        })
        .unwrap();
    id
}

fn task(store: &Store, id: Uuid) -> TaskRow {
    store
        .call_sync(|c| store::tasks::get(c, id))
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_successful_task_journals_every_step_completed() {
    let (engine, store) = engine();
    let vm = Uuid::new_v4();
    let id = record(&store, vm);
    let log = Arc::new(StdMutex::new(Vec::new()));
    let claim = engine.claim(vm, id, "test").unwrap();

    engine
        .run(claim, "test", recorder(&log, None))
        .await
        .unwrap();

    let t = task(&store, id);
    assert_eq!(t.state, TaskState::Completed);
    assert!(t.steps.iter().all(|s| s.state == StepState::Completed));
    assert_eq!(
        *log.lock().unwrap(),
        vec!["run one", "run two", "run three"]
    );
    assert_eq!(engine.holder(vm), None);
}

#[tokio::test]
async fn a_failed_step_unwinds_in_reverse_and_records_the_code() {
    let (engine, store) = engine();
    let vm = Uuid::new_v4();
    let id = record(&store, vm);
    let log = Arc::new(StdMutex::new(Vec::new()));
    let claim = engine.claim(vm, id, "test").unwrap();

    let err = engine
        .run(claim, "test", recorder(&log, Some("two")))
        .await
        .unwrap_err();

    assert_eq!(err.0, "two broke");
    assert_eq!(
        *log.lock().unwrap(),
        vec!["run one", "run two", "undo two", "undo one"]
    );
    let t = task(&store, id);
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.error_code.as_deref(), Some("TEST_FAILED"));
    assert_eq!(
        t.steps.iter().map(|s| s.state).collect::<Vec<_>>(),
        vec![StepState::RolledBack, StepState::Failed, StepState::Pending]
    );
}

#[tokio::test]
async fn a_resumed_task_skips_completed_steps() {
    let (engine, store) = engine();
    let vm = Uuid::new_v4();
    let id = record(&store, vm);
    store
        .call_sync(|c| {
            store::tasks::set_step(c, id, 0, StepState::Completed, None, "t1")?;
            store::tasks::set_step(c, id, 1, StepState::Running, None, "t1")
        })
        .unwrap();
    let log = Arc::new(StdMutex::new(Vec::new()));
    let claim = engine.claim(vm, id, "test").unwrap();

    engine
        .run(claim, "test", recorder(&log, None))
        .await
        .unwrap();

    assert_eq!(*log.lock().unwrap(), vec!["run two", "run three"]);
}

#[test]
fn a_vm_has_one_claim_at_a_time() {
    let (engine, _) = engine();
    let vm = Uuid::new_v4();
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());

    let held = engine.claim(vm, first, "create").unwrap();
    let refused = engine.claim(vm, second, "stop").err();
    drop(held);
    let after = engine.claim(vm, second, "stop").is_ok();

    assert_eq!(
        refused,
        Some(Busy {
            task: first,
            kind: "create"
        })
    );
    assert!(after);
}

#[tokio::test]
async fn a_cancelled_task_unwinds_and_ends_cancelled() {
    let (engine, store) = engine();
    let engine = Arc::new(engine);
    let vm = Uuid::new_v4();
    let id = record(&store, vm);
    let log = Arc::new(StdMutex::new(Vec::new()));
    let claim = engine.claim(vm, id, "test").unwrap();
    let op = Recorder {
        log: log.clone(),
        fail_at: None,
        block_at: Some("two"),
    };
    let runner = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(claim, "test", op).await })
    };
    while log.lock().unwrap().len() < 2 {
        tokio::task::yield_now().await;
    }

    assert_eq!(engine.cancel(vm), Some(id));
    let result = runner.await.unwrap();

    assert!(result.unwrap_err().is_cancelled());
    assert_eq!(
        *log.lock().unwrap(),
        vec!["run one", "run two", "undo two", "undo one"]
    );
    assert_eq!(task(&store, id).state, TaskState::Cancelled);
    assert!(
        engine
            .wait_released(vm, std::time::Duration::from_secs(1))
            .await
    );
}

#[tokio::test]
async fn a_task_that_died_unwinding_finishes_its_unwind_on_resume() {
    let (engine, store) = engine();
    let vm = Uuid::new_v4();
    let id = record(&store, vm);
    store
        .call_sync(|c| {
            store::tasks::set_state(c, id, TaskState::Running, None, "t1")?;
            store::tasks::set_step(c, id, 0, StepState::Completed, None, "t1")?;
            store::tasks::set_step(c, id, 1, StepState::Failed, Some("boom"), "t2")?;
            store::tasks::set_state(
                c,
                id,
                TaskState::Running,
                Some(("TEST_FAILED", "boom")),
                "t2",
            )
        })
        .unwrap();
    let log = Arc::new(StdMutex::new(Vec::new()));
    let claim = engine.claim(vm, id, "test").unwrap();

    let err = engine
        .run(claim, "test", recorder(&log, None))
        .await
        .unwrap_err();

    assert_eq!(err.0, "boom");
    assert_eq!(*log.lock().unwrap(), vec!["undo two", "undo one"]);
    assert_eq!(task(&store, id).state, TaskState::Failed);
}

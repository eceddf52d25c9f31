//! Tasks and their step journal.

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::Uuid;

use super::{Result, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => TaskState::Pending,
            "running" => TaskState::Running,
            "completed" => TaskState::Completed,
            "failed" => TaskState::Failed,
            "cancelled" => TaskState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Completed,
    Failed,
    /// Completed, then undone because a later step failed.
    RolledBack,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Completed => "completed",
            StepState::Failed => "failed",
            StepState::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => StepState::Pending,
            "running" => StepState::Running,
            "completed" => StepState::Completed,
            "failed" => StepState::Failed,
            "rolled_back" => StepState::RolledBack,
            other => return Err(StoreError::Malformed(format!("step state {other:?}"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct StepRow {
    /// 0-based.
    pub order: u32,
    pub name: String,
    pub state: StepState,
    #[schema(required = true, format = DateTime)]
    pub started_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub finished_at: Option<String>,
    #[schema(required = true)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub id: Uuid,
    pub kind: String,
    pub vps_id: Uuid,
    pub state: TaskState,
    /// Operation parameters (JSON), enough to resume the task after a restart.
    pub input: serde_json::Value,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub steps: Vec<StepRow>,
}

impl TaskRow {
    pub fn progress_percent(&self) -> u32 {
        if self.state == TaskState::Completed {
            return 100;
        }
        let total = self.steps.len() as u32;
        if total == 0 {
            return 0;
        }
        let done = self
            .steps
            .iter()
            .filter(|s| s.state == StepState::Completed)
            .count() as u32;
        done * 100 / total
    }
}

pub struct NewTask<'a> {
    pub id: Uuid,
    pub kind: &'a str,
    pub vps_id: Uuid,
    pub input: serde_json::Value,
    pub steps: &'a [&'a str],
    pub now: &'a str,
}

pub fn insert(conn: &Connection, task: &NewTask<'_>) -> Result<()> {
    conn.execute(
        "INSERT INTO tasks (id, kind, vps_id, state, input, created_at)
         VALUES (?1, ?2, ?3, 'pending', ?4, ?5)",
        params![
            task.id.to_string(),
            task.kind,
            task.vps_id.to_string(),
            task.input.to_string(),
            task.now
        ],
    )?;
    let mut stmt = conn.prepare(
        "INSERT INTO task_steps (task_id, ord, name, state) VALUES (?1, ?2, ?3, 'pending')",
    )?;
    for (i, name) in task.steps.iter().enumerate() {
        stmt.execute(params![task.id.to_string(), i as u32, name])?;
    }
    Ok(())
}

const TASK_COLUMNS: &str =
    "id, kind, vps_id, state, input, error, error_code, created_at, started_at, finished_at";

fn task_from_row(row: &Row<'_>) -> rusqlite::Result<[Option<String>; 10]> {
    let mut out: [Option<String>; 10] = Default::default();
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = row.get(i)?;
    }
    Ok(out)
}

fn finish_task(conn: &Connection, raw: [Option<String>; 10]) -> Result<TaskRow> {
    let [id, kind, vps_id, state, input, error, error_code, created_at, started_at, finished_at] =
        raw;
    let text = |v: Option<String>, what: &str| {
        v.ok_or_else(|| StoreError::Malformed(format!("task {what} is null")))
    };
    let id_s = text(id, "id")?;
    let id: Uuid = id_s
        .parse()
        .map_err(|_| StoreError::Malformed(format!("task id {id_s:?}")))?;
    let vps_s = text(vps_id, "vps_id")?;
    let state_s = text(state, "state")?;
    let input_s = text(input, "input")?;
    Ok(TaskRow {
        id,
        kind: text(kind, "kind")?,
        vps_id: vps_s
            .parse()
            .map_err(|_| StoreError::Malformed(format!("task vps id {vps_s:?}")))?,
        state: TaskState::parse(&state_s)
            .ok_or_else(|| StoreError::Malformed(format!("task state {state_s:?}")))?,
        input: serde_json::from_str(&input_s)
            .map_err(|e| StoreError::Malformed(format!("task input: {e}")))?,
        error,
        error_code,
        created_at: text(created_at, "created_at")?,
        started_at,
        finished_at,
        steps: steps(conn, id)?,
    })
}

fn steps(conn: &Connection, task_id: Uuid) -> Result<Vec<StepRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ord, name, state, started_at, finished_at, error FROM task_steps
         WHERE task_id = ?1 ORDER BY ord",
    )?;
    let rows = stmt.query_map([task_id.to_string()], |r| {
        Ok((
            r.get::<_, u32>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    rows.map(|r| {
        let (order, name, state, started_at, finished_at, error) = r?;
        Ok(StepRow {
            order,
            name,
            state: StepState::parse(&state)?,
            started_at,
            finished_at,
            error,
        })
    })
    .collect()
}

pub fn get(conn: &Connection, id: Uuid) -> Result<Option<TaskRow>> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
    let raw = conn
        .query_row(&sql, [id.to_string()], task_from_row)
        .optional()?;
    raw.map(|r| finish_task(conn, r)).transpose()
}

#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub vps_id: Option<Uuid>,
    pub state: Option<TaskState>,
    pub kind: Option<String>,
    pub limit: Option<u32>,
}

/// Tasks matching `filter`, newest first.
pub fn list(conn: &Connection, filter: &TaskFilter) -> Result<Vec<TaskRow>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks
         WHERE (?1 IS NULL OR vps_id = ?1) AND (?2 IS NULL OR state = ?2)
           AND (?3 IS NULL OR kind = ?3)
         ORDER BY created_at DESC, rowid DESC LIMIT ?4"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        params![
            filter.vps_id.map(|v| v.to_string()),
            filter.state.map(|s| s.as_str()),
            filter.kind,
            filter.limit.map(i64::from).unwrap_or(-1),
        ],
        task_from_row,
    )?;
    let raws: Vec<_> = rows.collect::<rusqlite::Result<_>>()?;
    raws.into_iter().map(|r| finish_task(conn, r)).collect()
}

/// The newest task of `kind` for `vps_id`.
pub fn latest_of_kind(conn: &Connection, vps_id: Uuid, kind: &str) -> Result<Option<TaskRow>> {
    Ok(list(
        conn,
        &TaskFilter {
            vps_id: Some(vps_id),
            kind: Some(kind.to_owned()),
            limit: Some(1),
            ..Default::default()
        },
    )?
    .into_iter()
    .next())
}

/// Tasks a previous run of the agent left unfinished.
pub fn unfinished(conn: &Connection) -> Result<Vec<TaskRow>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('pending', 'running')
         ORDER BY created_at, rowid"
    );
    let mut stmt = conn.prepare(&sql)?;
    let raws: Vec<_> = stmt
        .query_map([], task_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    raws.into_iter().map(|r| finish_task(conn, r)).collect()
}

pub fn set_state(
    conn: &Connection,
    id: Uuid,
    state: TaskState,
    error: Option<(&str, &str)>,
    now: &str,
) -> Result<()> {
    let (code, message) = error.unzip();
    conn.execute(
        "UPDATE tasks SET state = ?2,
            started_at = CASE WHEN ?2 = 'running' THEN COALESCE(started_at, ?3) ELSE started_at END,
            finished_at = CASE WHEN ?2 IN ('completed', 'failed', 'cancelled') THEN ?3
                               ELSE finished_at END,
            error_code = COALESCE(?4, error_code), error = COALESCE(?5, error)
         WHERE id = ?1",
        params![id.to_string(), state.as_str(), now, code, message],
    )?;
    Ok(())
}

pub fn set_step(
    conn: &Connection,
    task_id: Uuid,
    order: u32,
    state: StepState,
    error: Option<&str>,
    now: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE task_steps SET state = ?3,
            started_at = CASE WHEN ?3 = 'running' THEN ?4 ELSE started_at END,
            finished_at = CASE WHEN ?3 IN ('completed', 'failed') THEN ?4
                               WHEN ?3 = 'rolled_back' THEN COALESCE(finished_at, ?4)
                               ELSE finished_at END,
            error = COALESCE(?5, error)
         WHERE task_id = ?1 AND ord = ?2",
        params![task_id.to_string(), order, state.as_str(), now, error],
    )?;
    Ok(())
}

/// How many tasks are in each state.
pub fn count_by_state(conn: &Connection) -> Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_journaled_in_order() {
        let store = super::super::test_store();
        let id = Uuid::new_v4();
        let vps = Uuid::new_v4();

        let task = store
            .call_sync(|c| {
                insert(
                    c,
                    &NewTask {
                        id,
                        kind: "create",
                        vps_id: vps,
                        input: serde_json::json!({}),
                        steps: &["a", "b", "c"],
                        now: "t0",
                    },
                )?;
                set_state(c, id, TaskState::Running, None, "t1")?;
                set_step(c, id, 0, StepState::Running, None, "t1")?;
                set_step(c, id, 0, StepState::Completed, None, "t2")?;
                get(c, id)
            })
            .unwrap()
            .unwrap();

        assert_eq!(task.state, TaskState::Running);
        assert_eq!(task.started_at.as_deref(), Some("t1"));
        assert_eq!(
            task.steps.iter().map(|s| s.state).collect::<Vec<_>>(),
            vec![StepState::Completed, StepState::Pending, StepState::Pending]
        );
        assert_eq!(task.progress_percent(), 33);
    }

    #[test]
    fn unfinished_lists_pending_and_running_tasks_only() {
        let store = super::super::test_store();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());

        let left = store
            .call_sync(|c| {
                for id in [a, b] {
                    insert(
                        c,
                        &NewTask {
                            id,
                            kind: "start",
                            vps_id: Uuid::new_v4(),
                            input: serde_json::json!({}),
                            steps: &["start"],
                            now: "t0",
                        },
                    )?;
                }
                set_state(c, b, TaskState::Completed, None, "t1")?;
                unfinished(c)
            })
            .unwrap();

        assert_eq!(left.iter().map(|t| t.id).collect::<Vec<_>>(), vec![a]);
    }
}

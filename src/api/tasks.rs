//! `GET /v1/tasks`, `GET /v1/tasks/{id}`.

use std::sync::Arc;

use axum::extract::State;

use super::error::ApiError;
use super::extract::{task_id, vm_id, Path, QueryMap};
use super::openapi::{TaskId, TaskList};
use super::{ok, ApiResult, Envelope};
use crate::app::App;
use crate::errors::ErrorCode;
use crate::store::{TaskFilter, TaskState};
use crate::vm::model::TaskView;

/// Recent tasks, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(
        ("vps_id" = Option<String>, Query, pattern = r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$",
            description = "Only this VPS's tasks (a UUID; empty: all)"),
        ("state" = Option<String>, Query, pattern = "^(|pending|running|completed|failed|cancelled)$",
            description = "Only tasks in this state (empty: any)"),
        ("kind" = Option<String>, Query, description = "Only tasks of this kind (create, stop, …)"),
        ("limit" = Option<u64>, Query, minimum = 0, description = "Default 100; clamped to 1–1000"),
    ),
    responses((status = 200, description = "The tasks", body = Envelope<TaskList>)))]
pub async fn task_list(State(app): State<Arc<App>>, query: QueryMap) -> ApiResult {
    let state = query
        .get("state")
        .map(|s| {
            TaskState::parse(s).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidJson,
                    "state must be pending, running, completed, failed or cancelled",
                )
            })
        })
        .transpose()?;
    let filter = TaskFilter {
        vps_id: query.get("vps_id").map(vm_id).transpose()?,
        state,
        kind: query.get("kind").map(str::to_owned),
        limit: Some(query.number("limit")?.unwrap_or(100).clamp(1, 1000) as u32),
    };
    let tasks = app.vms.tasks(filter).await?;
    Ok(ok(serde_json::json!({ "tasks": tasks })))
}

/// One task with its steps.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(TaskId),
    responses((status = 200, description = "The task", body = Envelope<TaskView>)))]
pub async fn task_get(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.task(task_id(&id)?).await?))
}

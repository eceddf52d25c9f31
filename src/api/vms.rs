//! `/v1/vms…`: create, list, read, power actions, delete.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::{vm_id, JsonBody, Path, QueryMap};
use super::{ok, with_status, ApiResult};
use crate::app::App;
use crate::errors::ErrorCode;
use crate::vm::model::{CreateVmRequest, ListQuery, ReinstallRequest, ResizeRequest, VmStatus};
use crate::vm::state::Action;
use crate::vm::StopOptions;

const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 100;

pub async fn vm_create(
    State(app): State<Arc<App>>,
    JsonBody(req): JsonBody<CreateVmRequest>,
) -> ApiResult {
    let accepted = app.vms.create(req).await?;
    Ok(with_status(
        StatusCode::ACCEPTED,
        accepted,
        Some("deployment started".into()),
    ))
}

pub async fn vm_list(State(app): State<Arc<App>>, query: QueryMap) -> ApiResult {
    let status = query
        .get("status")
        .map(|s| {
            VmStatus::parse(s).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidJson,
                    "status must be deploying, running, stopped, suspended, failed or unknown",
                )
            })
        })
        .transpose()?;
    let list = app
        .vms
        .list(ListQuery {
            status,
            limit: query
                .number("limit")?
                .unwrap_or(DEFAULT_LIMIT)
                .clamp(1, MAX_LIMIT) as usize,
            offset: query.number("offset")?.unwrap_or(0).min(u32::MAX as u64) as usize,
        })
        .await?;
    Ok(ok(list))
}

pub async fn vm_get(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.get(vm_id(&id)?).await?))
}

pub async fn vm_deployment(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.deployment(vm_id(&id)?).await?))
}

pub async fn vm_delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    let id = vm_id(&id)?;
    // Outstanding console tickets die with the VM, whatever the delete's outcome.
    app.tickets.revoke_vm(id);
    Ok(ok(app.vms.delete(id).await?))
}

async fn power(app: &App, id: &str, action: Action, stop: StopOptions) -> ApiResult {
    Ok(ok(app.vms.action(vm_id(id)?, action, stop).await?))
}

pub async fn vm_start(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Start, StopOptions::default()).await
}

pub async fn vm_stop(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    query: QueryMap,
) -> ApiResult {
    let defaults = StopOptions::default();
    let stop = StopOptions {
        force: query.flag("force")?,
        timeout_s: query.number("timeout_s")?.unwrap_or(defaults.timeout_s),
    };
    power(&app, &id, Action::Stop, stop).await
}

pub async fn vm_restart(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    query: QueryMap,
) -> ApiResult {
    let defaults = StopOptions::default();
    let stop = StopOptions {
        force: query.flag("force")?,
        timeout_s: query.number("timeout_s")?.unwrap_or(defaults.timeout_s),
    };
    power(&app, &id, Action::Restart, stop).await
}

pub async fn vm_reset(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Reset, StopOptions::default()).await
}

pub async fn vm_suspend(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Suspend, StopOptions::default()).await
}

pub async fn vm_resume(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Resume, StopOptions::default()).await
}

pub async fn vm_reinstall(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ReinstallRequest>,
) -> ApiResult {
    let accepted = app.vms.reinstall(vm_id(&id)?, req).await?;
    Ok(with_status(
        StatusCode::ACCEPTED,
        accepted,
        Some("reinstall started".into()),
    ))
}

pub async fn vm_resize(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ResizeRequest>,
) -> ApiResult {
    let accepted = app.vms.resize(vm_id(&id)?, req).await?;
    Ok(with_status(
        StatusCode::ACCEPTED,
        accepted,
        Some("resize started".into()),
    ))
}

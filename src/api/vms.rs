//! `/v1/vms…`: create, list, read, power actions, delete.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::{vm_id, JsonBody, Path, QueryMap};
use super::openapi::VpsId;
use super::{ok, with_status, ApiResult, Envelope};
use crate::app::App;
use crate::errors::ErrorCode;
use crate::vm::model::{
    ActionResult, CreateAccepted, CreateVmRequest, Deleted, Deployment, ListQuery,
    ReinstallRequest, ResizeRequest, TaskAccepted, VmDetail, VmList, VmStatus,
};
use crate::vm::state::Action;
use crate::vm::StopOptions;

const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 100;

/// Create a VPS: its deployment runs as a task.
///
/// Repeating the same body with the same id returns the same task; the same id with another
/// body is `VPS_EXISTS`.
#[utoipa::path(post, path = "/v1/vms", tag = "vms",
    request_body = CreateVmRequest,
    responses((status = 202, description = "Deployment started", body = Envelope<CreateAccepted>)))]
pub async fn vm_create(
    State(app): State<Arc<App>>,
    JsonBody(req): JsonBody<CreateVmRequest>,
) -> ApiResult {
    let accepted = app
        .vms
        .detached(move |vms| async move { vms.create(req).await })
        .await?;
    Ok(with_status(
        StatusCode::ACCEPTED,
        accepted,
        Some("deployment started".into()),
    ))
}

/// List VPSs.
#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    params(
        ("status" = Option<String>, Query, pattern = "^(|deploying|running|stopped|suspended|failed|unknown)$",
            description = "Only VPSs in this status (empty: any, as in `?status=&limit=50`)"),
        ("limit" = Option<u64>, Query, minimum = 0, description = "Page size, default 50; clamped to 1–100"),
        ("offset" = Option<u64>, Query, minimum = 0, description = "Default 0"),
    ),
    responses((status = 200, description = "One page of VPSs", body = Envelope<VmList>)))]
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

/// One VPS in detail.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms", params(VpsId),
    responses((status = 200, description = "The VPS", body = Envelope<VmDetail>)))]
pub async fn vm_get(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.get(vm_id(&id)?).await?))
}

/// The deployment progress of a VPS, as the platform shows it.
#[utoipa::path(get, path = "/v1/vms/{id}/deployment", tag = "vms", params(VpsId),
    responses((status = 200, description = "The deployment document", body = Envelope<Deployment>)))]
pub async fn vm_deployment(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.deployment(vm_id(&id)?).await?))
}

/// Delete a VPS with its disks, seed, snapshots, addresses and network memberships.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms", params(VpsId),
    responses((status = 200, description = "The VPS is gone", body = Envelope<Deleted>)))]
pub async fn vm_delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    let id = vm_id(&id)?;
    // Outstanding console tickets and open sessions die with the VM, whatever the
    // delete's outcome.
    app.tickets.revoke_vm(id);
    app.consoles.close_vm(id);
    Ok(ok(app
        .vms
        .detached(move |vms| async move { vms.delete(id).await })
        .await?))
}

async fn power(app: &App, id: &str, action: Action, stop: StopOptions) -> ApiResult {
    let id = vm_id(id)?;
    let done = app
        .vms
        .detached(move |vms| async move { vms.action(id, action, stop).await })
        .await?;
    if action == Action::Suspend {
        // Whoever watched the VM's screen does not watch it frozen.
        app.consoles.close_vm(id);
    }
    Ok(ok(done))
}

/// Start a VPS.
#[utoipa::path(post, path = "/v1/vms/{id}/start", tag = "vms", params(VpsId),
    responses((status = 200, description = "The state is reached", body = Envelope<ActionResult>)))]
pub async fn vm_start(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Start, StopOptions::default()).await
}

/// Stop a VPS: ACPI shutdown, powered off after `timeout_s`.
#[utoipa::path(post, path = "/v1/vms/{id}/stop", tag = "vms",
    params(VpsId,
        ("force" = Option<bool>, Query, description = "Power off at once; default false"),
        ("timeout_s" = Option<u64>, Query, minimum = 0,
            description = "Seconds the guest may take to shut down; default 60, at most 3600"),
    ),
    responses((status = 200, description = "The state is reached", body = Envelope<ActionResult>)))]
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

/// Restart a VPS: ACPI shutdown (powered off after `timeout_s`), then start.
#[utoipa::path(post, path = "/v1/vms/{id}/restart", tag = "vms",
    params(VpsId,
        ("force" = Option<bool>, Query, description = "Power off at once; default false"),
        ("timeout_s" = Option<u64>, Query, minimum = 0,
            description = "Seconds the guest may take to shut down; default 60, at most 3600"),
    ),
    responses((status = 200, description = "The state is reached", body = Envelope<ActionResult>)))]
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

/// Reset a VPS (hard reboot).
#[utoipa::path(post, path = "/v1/vms/{id}/reset", tag = "vms", params(VpsId),
    responses((status = 200, description = "The state is reached", body = Envelope<ActionResult>)))]
pub async fn vm_reset(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Reset, StopOptions::default()).await
}

/// Suspend (pause) a VPS.
#[utoipa::path(post, path = "/v1/vms/{id}/suspend", tag = "vms", params(VpsId),
    responses((status = 200, description = "The state is reached", body = Envelope<ActionResult>)))]
pub async fn vm_suspend(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Suspend, StopOptions::default()).await
}

/// Resume a suspended VPS.
#[utoipa::path(post, path = "/v1/vms/{id}/resume", tag = "vms", params(VpsId),
    responses((status = 200, description = "The state is reached", body = Envelope<ActionResult>)))]
pub async fn vm_resume(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    power(&app, &id, Action::Resume, StopOptions::default()).await
}

/// Reinstall a VPS: its disk is cloned again from a template; id, addresses and MACs stay.
#[utoipa::path(post, path = "/v1/vms/{id}/reinstall", tag = "vms", params(VpsId),
    request_body = ReinstallRequest,
    responses((status = 202, description = "Reinstall started", body = Envelope<TaskAccepted>)))]
pub async fn vm_reinstall(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ReinstallRequest>,
) -> ApiResult {
    let id = vm_id(&id)?;
    let accepted = app
        .vms
        .detached(move |vms| async move { vms.reinstall(id, req).await })
        .await?;
    // The old installation's consoles end with it.
    app.tickets.revoke_vm(id);
    app.consoles.close_vm(id);
    Ok(with_status(
        StatusCode::ACCEPTED,
        accepted,
        Some("reinstall started".into()),
    ))
}

/// Resize a VPS. Growing the disk keeps its data; shrinking needs a confirmation.
#[utoipa::path(post, path = "/v1/vms/{id}/resize", tag = "vms", params(VpsId),
    request_body = ResizeRequest,
    responses((status = 202, description = "Resize started", body = Envelope<TaskAccepted>)))]
pub async fn vm_resize(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ResizeRequest>,
) -> ApiResult {
    let accepted = {
        let id = vm_id(&id)?;
        app.vms
            .detached(move |vms| async move { vms.resize(id, req).await })
            .await?
    };
    Ok(with_status(
        StatusCode::ACCEPTED,
        accepted,
        Some("resize started".into()),
    ))
}

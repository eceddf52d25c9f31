//! `/v1/vms/{id}/snapshots…`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::extract::{vm_id, JsonBody, Path};
use super::openapi::{VpsId, VpsSnapshot};
use super::{ok, with_status, ApiResult, Envelope};
use crate::app::App;
use crate::vm::snapshots::{CreateSnapshotRequest, SnapshotCreated, SnapshotDone, SnapshotList};

/// The snapshots of a VPS.
#[utoipa::path(get, path = "/v1/vms/{id}/snapshots", tag = "snapshots", params(VpsId),
    responses((status = 200, description = "Its snapshots and their limit", body = Envelope<SnapshotList>)))]
pub async fn snapshot_list(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.snapshots(vm_id(&id)?).await?))
}

/// Take a snapshot of a VPS's disk, and of its memory with `include_ram`.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshots", tag = "snapshots", params(VpsId),
    request_body = CreateSnapshotRequest,
    responses((status = 201, description = "The snapshot", body = Envelope<SnapshotCreated>)))]
pub async fn snapshot_create(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshotRequest>,
) -> ApiResult {
    let created = {
        let id = vm_id(&id)?;
        app.vms
            .detached(move |vms| async move { vms.snapshot_create(id, req).await })
            .await?
    };
    Ok(with_status(StatusCode::CREATED, created, None))
}

/// Roll a VPS back to a snapshot.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshots/{name}/rollback", tag = "snapshots",
    params(VpsSnapshot),
    responses((status = 200, description = "The VPS is as it was", body = Envelope<SnapshotDone>)))]
pub async fn snapshot_rollback(
    State(app): State<Arc<App>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    let id = vm_id(&id)?;
    Ok(ok(app
        .vms
        .detached(move |vms| async move { vms.snapshot_rollback(id, &name).await })
        .await?))
}

/// Delete a snapshot.
#[utoipa::path(delete, path = "/v1/vms/{id}/snapshots/{name}", tag = "snapshots",
    params(VpsSnapshot),
    responses((status = 200, description = "The snapshot is gone", body = Envelope<SnapshotDone>)))]
pub async fn snapshot_delete(
    State(app): State<Arc<App>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    let id = vm_id(&id)?;
    Ok(ok(app
        .vms
        .detached(move |vms| async move { vms.snapshot_delete(id, &name).await })
        .await?))
}

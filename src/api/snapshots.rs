//! `/v1/vms/{id}/snapshots…`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::extract::{vm_id, JsonBody, Path};
use super::{ok, with_status, ApiResult};
use crate::app::App;
use crate::vm::snapshots::CreateSnapshotRequest;

pub async fn snapshot_list(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.snapshots(vm_id(&id)?).await?))
}

pub async fn snapshot_create(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshotRequest>,
) -> ApiResult {
    let created = app.vms.snapshot_create(vm_id(&id)?, req).await?;
    Ok(with_status(StatusCode::CREATED, created, None))
}

pub async fn snapshot_rollback(
    State(app): State<Arc<App>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    Ok(ok(app.vms.snapshot_rollback(vm_id(&id)?, &name).await?))
}

pub async fn snapshot_delete(
    State(app): State<Arc<App>>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    Ok(ok(app.vms.snapshot_delete(vm_id(&id)?, &name).await?))
}

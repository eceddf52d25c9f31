//! `/v1/vms/{id}/ips…` and `/v1/private-networks…`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::extract::{vm_id, JsonBody, OptionalJson, Path};
use super::{ok, with_status, ApiResult};
use crate::app::App;
use crate::vm::ips::{AddIpRequest, MoveIpRequest};
use crate::vm::private_nets::{AttachRequest, CreateNetworkRequest};

pub async fn ip_list(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.ips(vm_id(&id)?).await?))
}

pub async fn ip_add(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<AddIpRequest>,
) -> ApiResult {
    let added = app.vms.add_ip(vm_id(&id)?, req).await?;
    Ok(with_status(StatusCode::CREATED, added, None))
}

pub async fn ip_remove(
    State(app): State<Arc<App>>,
    Path((id, address)): Path<(String, String)>,
) -> ApiResult {
    let id = vm_id(&id)?;
    app.vms.remove_ip(id, &address).await?;
    Ok(ok(
        serde_json::json!({ "deleted": true, "vps_id": id, "address": address }),
    ))
}

pub async fn ip_move(
    State(app): State<Arc<App>>,
    Path((id, address)): Path<(String, String)>,
    JsonBody(req): JsonBody<MoveIpRequest>,
) -> ApiResult {
    Ok(ok(app.vms.move_ip(vm_id(&id)?, &address, req).await?))
}

pub async fn network_list(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.vms.networks().await?))
}

pub async fn subnets(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.vms.subnets().await?))
}

pub async fn network_create(
    State(app): State<Arc<App>>,
    JsonBody(req): JsonBody<CreateNetworkRequest>,
) -> ApiResult {
    let network = app.vms.network_create(req).await?;
    Ok(with_status(StatusCode::CREATED, network, None))
}

pub async fn network_delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.network_delete(&id).await?))
}

pub async fn network_attach(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<AttachRequest>,
) -> ApiResult {
    let member = app.vms.network_attach(&id, req).await?;
    Ok(with_status(StatusCode::CREATED, member, None))
}

pub async fn network_detach(
    State(app): State<Arc<App>>,
    Path((id, membership)): Path<(String, String)>,
) -> ApiResult {
    Ok(ok(app.vms.network_detach(&id, &membership).await?))
}

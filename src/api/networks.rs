//! `/v1/vms/{id}/ips…` and `/v1/private-networks…`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::extract::{vm_id, JsonBody, OptionalJson, Path};
use super::openapi::{
    IpRemoved, MemberDetached, NetworkDeleted, NetworkId, NetworkMember, VpsAddress, VpsId,
};
use super::{ok, with_status, ApiResult, Envelope};
use crate::app::App;
use crate::vm::ips::{AddIpRequest, IpAdded, IpList, IpMoved, MoveIpRequest};
use crate::vm::private_nets::{
    AttachRequest, CreateNetworkRequest, MemberView, NetworkList, NetworkView, SubnetStatus,
};

/// The addresses of a VPS.
#[utoipa::path(get, path = "/v1/vms/{id}/ips", tag = "ips", params(VpsId),
    responses((status = 200, description = "Its addresses and the limit of extra ones",
        body = Envelope<IpList>)))]
pub async fn ip_list(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vms.ips(vm_id(&id)?).await?))
}

/// Add an extra address to a VPS: the one given, or the pool's next free one.
#[utoipa::path(post, path = "/v1/vms/{id}/ips", tag = "ips", params(VpsId),
    request_body(content = Option<AddIpRequest>, description = "May be empty"),
    responses((status = 201, description = "The address is the VPS's", body = Envelope<IpAdded>)))]
pub async fn ip_add(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<AddIpRequest>,
) -> ApiResult {
    let added = {
        let id = vm_id(&id)?;
        app.vms
            .detached(move |vms| async move { vms.add_ip(id, req).await })
            .await?
    };
    Ok(with_status(StatusCode::CREATED, added, None))
}

/// Remove an extra address from a VPS (the primary one cannot be removed).
#[utoipa::path(delete, path = "/v1/vms/{id}/ips/{address}", tag = "ips", params(VpsAddress),
    responses((status = 200, description = "The address is released", body = Envelope<IpRemoved>)))]
pub async fn ip_remove(
    State(app): State<Arc<App>>,
    Path((id, address)): Path<(String, String)>,
) -> ApiResult {
    let id = vm_id(&id)?;
    app.vms
        .detached({
            let address = address.clone();
            move |vms| async move { vms.remove_ip(id, &address).await }
        })
        .await?;
    Ok(ok(
        serde_json::json!({ "deleted": true, "vps_id": id, "address": address }),
    ))
}

/// Move an extra address to another VPS of this node.
#[utoipa::path(post, path = "/v1/vms/{id}/ips/{address}/move", tag = "ips", params(VpsAddress),
    request_body = MoveIpRequest,
    responses((status = 200, description = "The address belongs to the target", body = Envelope<IpMoved>)))]
pub async fn ip_move(
    State(app): State<Arc<App>>,
    Path((id, address)): Path<(String, String)>,
    JsonBody(req): JsonBody<MoveIpRequest>,
) -> ApiResult {
    let id = vm_id(&id)?;
    Ok(ok(app
        .vms
        .detached(move |vms| async move { vms.move_ip(id, &address, req).await })
        .await?))
}

/// The private networks of this node, with their members.
#[utoipa::path(get, path = "/v1/private-networks", tag = "private-networks",
    responses((status = 200, description = "The networks", body = Envelope<NetworkList>)))]
pub async fn network_list(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.vms.networks().await?))
}

/// The private subnet allocator: its pool and what is taken.
#[utoipa::path(get, path = "/v1/private-networks/subnets", tag = "private-networks",
    responses((status = 200, description = "The allocator's status", body = Envelope<SubnetStatus>)))]
pub async fn subnets(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.vms.subnets().await?))
}

/// Create a private network; its VNI and subnet are allocated when not given.
#[utoipa::path(post, path = "/v1/private-networks", tag = "private-networks",
    request_body = CreateNetworkRequest,
    responses((status = 201, description = "The network", body = Envelope<NetworkView>)))]
pub async fn network_create(
    State(app): State<Arc<App>>,
    JsonBody(req): JsonBody<CreateNetworkRequest>,
) -> ApiResult {
    let network = app
        .vms
        .detached(move |vms| async move { vms.network_create(req).await })
        .await?;
    Ok(with_status(StatusCode::CREATED, network, None))
}

/// Delete a private network that has no members.
#[utoipa::path(delete, path = "/v1/private-networks/{id}", tag = "private-networks",
    params(NetworkId),
    responses((status = 200, description = "The network is gone", body = Envelope<NetworkDeleted>)))]
pub async fn network_delete(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app
        .vms
        .detached(move |vms| async move { vms.network_delete(&id).await })
        .await?))
}

/// Attach a VPS to a private network: a new NIC with an address of its subnet.
#[utoipa::path(post, path = "/v1/private-networks/{id}/attach", tag = "private-networks",
    params(NetworkId),
    request_body = AttachRequest,
    responses((status = 201, description = "The membership", body = Envelope<MemberView>)))]
pub async fn network_attach(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<AttachRequest>,
) -> ApiResult {
    let member = app
        .vms
        .detached(move |vms| async move { vms.network_attach(&id, req).await })
        .await?;
    Ok(with_status(StatusCode::CREATED, member, None))
}

/// Detach a VPS from a private network: its NIC and address are removed.
#[utoipa::path(delete, path = "/v1/private-networks/{id}/members/{membership_id}",
    tag = "private-networks", params(NetworkMember),
    responses((status = 200, description = "The membership is gone", body = Envelope<MemberDetached>)))]
pub async fn network_detach(
    State(app): State<Arc<App>>,
    Path((id, membership)): Path<(String, String)>,
) -> ApiResult {
    Ok(ok(app
        .vms
        .detached(move |vms| async move { vms.network_detach(&id, &membership).await })
        .await?))
}

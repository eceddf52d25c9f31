//! `GET /v1/health`, `GET /v1/node`, `GET /v1/templates`.

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;

use super::auth::Trusted;

use super::{ok, ApiResult, Envelope};
use crate::app::{App, Health, NodeInfo, Templates};

/// The agent's health; needs no token. It is answered from the state a background check
/// keeps (a flood of health checks costs libvirt nothing), and names where libvirt is only
/// to a caller with a token.
#[utoipa::path(get, path = "/v1/health", tag = "node", security(()),
    responses((status = 200, description = "Healthy, or degraded while libvirt is unreachable \
        or QEMU runs unconfined", body = Envelope<Health>)))]
pub async fn health(State(app): State<Arc<App>>, trusted: Option<Extension<Trusted>>) -> ApiResult {
    let trusted = trusted.is_some_and(|Extension(Trusted(t))| t);
    Ok(ok(app.health(trusted)))
}

/// The host: CPU, memory, storage, versions, instances and what they are allocated.
#[utoipa::path(get, path = "/v1/node", tag = "node",
    responses((status = 200, description = "The node", body = Envelope<NodeInfo>)))]
pub async fn node_info(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.node_info().await?))
}

/// The templates a VPS can be created from.
#[utoipa::path(get, path = "/v1/templates", tag = "node",
    responses((status = 200, description = "The node's templates", body = Envelope<Templates>)))]
pub async fn templates(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.templates().await?))
}

//! `GET /v1/health`, `GET /v1/node`, `GET /v1/templates`.

use std::sync::Arc;

use axum::extract::State;

use super::{ok, ApiResult};
use crate::app::App;

pub async fn health(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.health().await))
}

pub async fn node_info(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.node_info().await?))
}

pub async fn templates(State(app): State<Arc<App>>) -> ApiResult {
    Ok(ok(app.templates().await?))
}

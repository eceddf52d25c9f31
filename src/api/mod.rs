//! The HTTP API of `node-api.md`, served identically on TCP and on the Unix socket.
//!
//! How a request flows:
//! 1. `limit_body` refuses a declared body over `api.max_body_bytes` with 413 before
//!    anything reads it; `DefaultBodyLimit` enforces the same bound while reading.
//! 2. The router matches a path and method; no match is 404 `ROUTE_NOT_FOUND` or
//!    405 `METHOD_NOT_ALLOWED`, in the envelope.
//! 3. Every route but `/v1/health` passes `auth::require_auth` (bearer token on TCP, peer
//!    credentials on the socket).
//! 4. The handler turns the request into a domain call (`vm::VmManager`, `app::App`), awaits
//!    it, and wraps the result: `{"success": true, "data": …}`. Domain errors become
//!    envelope errors through the one table in `error.rs`.
//! 5. A panic anywhere below is caught and answered with a 500 envelope; the agent lives on.
//!
//! `openapi` describes all of this as an OpenAPI document, served at `GET /v1/openapi.json`
//! and checked in as `openapi.json`; `ROUTES` lists what the router serves, and the tests
//! hold the router, the list and the document to each other.

pub mod auth;
mod console;
pub mod error;
pub mod extract;
pub mod listener;
mod networks;
mod node;
pub mod openapi;
mod snapshots;
mod status;
mod tasks;
mod vms;

use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::app::App;
use crate::errors::ErrorCode;
use error::ApiError;

/// The peer of a Unix socket connection, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for UnixPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => UnixPeer {
                uid: cred.uid(),
                gid: cred.gid(),
            },
            // Unknown peers get an unprivileged identity.
            Err(_) => UnixPeer {
                uid: u32::MAX,
                gid: u32::MAX,
            },
        }
    }
}

/// Every success answer: `{"success": true, "data": …, "message"?: …}`.
#[derive(Serialize, utoipa::ToSchema)]
struct Envelope<T> {
    #[schema(schema_with = openapi::always_true)]
    success: bool,
    data: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// The `error_code` of a request that failed inside the agent.
const INTERNAL_ERROR: &str = "INTERNAL_ERROR";

/// Every route the router serves, as `(method, path)` in the router's syntax. The tests
/// hold it to the router (each path answers exactly its listed methods) and to the OpenAPI
/// document (which holds these operations and no other).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/node"),
    ("GET", "/v1/templates"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{id}"),
    ("DELETE", "/v1/vms/{id}"),
    ("GET", "/v1/vms/{id}/deployment"),
    ("POST", "/v1/vms/{id}/start"),
    ("POST", "/v1/vms/{id}/stop"),
    ("POST", "/v1/vms/{id}/restart"),
    ("POST", "/v1/vms/{id}/reset"),
    ("POST", "/v1/vms/{id}/suspend"),
    ("POST", "/v1/vms/{id}/resume"),
    ("POST", "/v1/vms/{id}/reinstall"),
    ("POST", "/v1/vms/{id}/resize"),
    ("GET", "/v1/vms/{id}/snapshots"),
    ("POST", "/v1/vms/{id}/snapshots"),
    ("DELETE", "/v1/vms/{id}/snapshots/{name}"),
    ("POST", "/v1/vms/{id}/snapshots/{name}/rollback"),
    ("GET", "/v1/vms/{id}/ips"),
    ("POST", "/v1/vms/{id}/ips"),
    ("DELETE", "/v1/vms/{id}/ips/{address}"),
    ("POST", "/v1/vms/{id}/ips/{address}/move"),
    ("GET", "/v1/private-networks"),
    ("POST", "/v1/private-networks"),
    ("GET", "/v1/private-networks/subnets"),
    ("DELETE", "/v1/private-networks/{id}"),
    ("POST", "/v1/private-networks/{id}/attach"),
    (
        "DELETE",
        "/v1/private-networks/{id}/members/{membership_id}",
    ),
    ("GET", "/v1/vms/{id}/status"),
    ("GET", "/v1/vms/{id}/status/stream"),
    ("POST", "/v1/vms/{id}/console"),
    ("GET", "/metrics"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/{id}"),
    ("GET", "/console/{ticket}"),
    ("GET", "/console/{ticket}/novnc/{*path}"),
    ("GET", "/v1/console/ws"),
];

/// `200 {"success": true, "data": data}`.
pub fn ok<T: Serialize>(data: T) -> Response {
    with_status(StatusCode::OK, data, None)
}

pub fn with_status<T: Serialize>(status: StatusCode, data: T, message: Option<String>) -> Response {
    (
        status,
        Json(Envelope {
            success: true,
            data,
            message,
        }),
    )
        .into_response()
}

pub type ApiResult = Result<Response, ApiError>;

pub fn router(app: Arc<App>) -> Router {
    let auth = Arc::new(auth::Auth::from_config(&app.config.api));
    let protected = Router::new()
        .route("/v1/node", get(node::node_info))
        .route("/v1/templates", get(node::templates))
        .route("/v1/vms", get(vms::vm_list).post(vms::vm_create))
        .route("/v1/vms/{id}", get(vms::vm_get).delete(vms::vm_delete))
        .route("/v1/vms/{id}/deployment", get(vms::vm_deployment))
        .route("/v1/vms/{id}/start", post(vms::vm_start))
        .route("/v1/vms/{id}/stop", post(vms::vm_stop))
        .route("/v1/vms/{id}/restart", post(vms::vm_restart))
        .route("/v1/vms/{id}/reset", post(vms::vm_reset))
        .route("/v1/vms/{id}/suspend", post(vms::vm_suspend))
        .route("/v1/vms/{id}/resume", post(vms::vm_resume))
        .route("/v1/vms/{id}/reinstall", post(vms::vm_reinstall))
        .route("/v1/vms/{id}/resize", post(vms::vm_resize))
        .route(
            "/v1/vms/{id}/snapshots",
            get(snapshots::snapshot_list).post(snapshots::snapshot_create),
        )
        .route(
            "/v1/vms/{id}/snapshots/{name}",
            delete(snapshots::snapshot_delete),
        )
        .route(
            "/v1/vms/{id}/snapshots/{name}/rollback",
            post(snapshots::snapshot_rollback),
        )
        .route(
            "/v1/vms/{id}/ips",
            get(networks::ip_list).post(networks::ip_add),
        )
        .route("/v1/vms/{id}/ips/{address}", delete(networks::ip_remove))
        .route("/v1/vms/{id}/ips/{address}/move", post(networks::ip_move))
        .route(
            "/v1/private-networks",
            get(networks::network_list).post(networks::network_create),
        )
        .route("/v1/private-networks/subnets", get(networks::subnets))
        .route(
            "/v1/private-networks/{id}",
            delete(networks::network_delete),
        )
        .route(
            "/v1/private-networks/{id}/attach",
            post(networks::network_attach),
        )
        .route(
            "/v1/private-networks/{id}/members/{membership_id}",
            delete(networks::network_detach),
        )
        .route("/v1/vms/{id}/status", get(status::vm_status))
        .route("/v1/vms/{id}/status/stream", get(status::vm_status_stream))
        .route("/v1/vms/{id}/console", post(console::console_create))
        .route("/metrics", get(status::metrics))
        .route("/v1/tasks", get(tasks::task_list))
        .route("/v1/tasks/{id}", get(tasks::task_get))
        .route("/v1/openapi.json", get(openapi::openapi_json))
        .route_layer(middleware::from_fn_with_state(
            auth.clone(),
            auth::require_auth,
        ))
        .route_layer(middleware::from_fn_with_state(app.clone(), count_requests));
    // No bearer token: health, and the console routes, which the ticket authenticates.
    let public = Router::new()
        .route("/v1/health", get(node::health))
        .route("/console/{ticket}", get(console::console_page))
        .route(
            "/console/{ticket}/novnc/{*path}",
            get(console::console_asset),
        )
        .route("/v1/console/ws", get(console::console_ws))
        .route_layer(middleware::from_fn_with_state(auth, auth::note_auth))
        .route_layer(middleware::from_fn_with_state(app.clone(), count_requests));
    let max_body = app.config.api.max_body_bytes;
    Router::new()
        .merge(public)
        .merge(protected)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(app.clone(), read_body))
        .layer(middleware::from_fn(ensure_envelope))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(app)
}

/// Counts every routed request by route pattern, method and status, for `/metrics`.
async fn count_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let response = next.run(req).await;
    app.requests
        .record(&route, method.as_str(), response.status().as_u16());
    response
}

async fn route_not_found(State(app): State<Arc<App>>, req: Request) -> ApiError {
    app.requests.record("unmatched", req.method().as_str(), 404);
    ApiError::new(
        ErrorCode::RouteNotFound,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(State(app): State<Arc<App>>, req: Request) -> ApiError {
    app.requests.record("unmatched", req.method().as_str(), 405);
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Refuses a declared oversized body at once, on every route, then reads the body whole
/// within `api.body_timeout_ms` (a client that stops sending mid-body gets 408 instead of
/// holding the request open), so handlers get it from memory.
async fn read_body(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.config.api.max_body_bytes as u64) {
        return ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "request body exceeds {} bytes",
                app.config.api.max_body_bytes
            ),
        )
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let max = app.config.api.max_body_bytes;
    let timeout = std::time::Duration::from_millis(app.config.api.body_timeout_ms);
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, max)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            // Over the limit while streaming, or the connection broke mid-body.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("request body exceeds {max} bytes"),
                )
            } else {
                ApiError::new(ErrorCode::InvalidJson, "the request body could not be read")
            }
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} ms (api.body_timeout_ms)",
                    timeout.as_millis()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// The last line of defence for the envelope: an error that some extractor or layer
/// answered in plain text (our own errors are already JSON) is rewritten into it.
async fn ensure_envelope(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() && !status.is_server_error() || is_json {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UPGRADE_REQUIRED => ErrorCode::WebsocketRequired,
        StatusCode::UNAUTHORIZED => ErrorCode::NoApiKey,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::HypervisorUnavailable,
        s if s.is_client_error() => ErrorCode::InvalidJson,
        _ => {
            tracing::error!(
                status = status.as_u16(),
                "a layer answered an error outside the envelope"
            );
            let mut out = internal_error();
            *out.status_mut() = status;
            return out;
        }
    };
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let detail = String::from_utf8_lossy(&body);
    let mut out = ApiError::new(code, detail.trim().to_owned()).into_response();
    // Keep the status the layer chose (e.g. 400 vs 415) when it differs from the code's.
    *out.status_mut() = status;
    out
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    internal_error()
}

fn internal_error() -> Response {
    let body = serde_json::json!({
        "success": false,
        "error": "Internal error",
        "error_code": INTERNAL_ERROR,
        "message": "the request failed inside the agent; its log has the details",
    });
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

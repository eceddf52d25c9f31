//! Consoles: `POST /v1/vms/{id}/console` issues a ticket; `GET /console/{ticket}` serves the
//! noVNC page and `GET /console/{ticket}/novnc/…` its files; `GET /v1/console/ws?ticket=`
//! is the WebSocket. The last three are authenticated by the ticket alone (a browser
//! cannot send the control plane's bearer token), and every refusal happens before any
//! upgrade.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::error::ErrorBody;
use super::extract::{vm_id, JsonBody, Path, QueryMap};
use super::openapi::VpsId;
use super::status::websocket_required;
use super::{ok, ApiResult, Envelope};
use crate::app::App;
use crate::console::{self, ConsoleKind, Grant, TicketError};
use crate::errors::ErrorCode;
use crate::hypervisor::PowerState;

const MAX_TTL_S: u64 = 300;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleRequest {
    #[serde(rename = "type")]
    #[schema(value_type = ConsoleKind, required = true)]
    pub kind: Option<ConsoleKind>,
    /// How long the ticket stays valid; default `console.ticket_ttl_s`.
    #[schema(minimum = 1, maximum = 300)]
    #[serde(default, deserialize_with = "crate::numbers::opt_u64")]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ConsoleTicket {
    pub vps_id: uuid::Uuid,
    pub console_url: String,
    pub websocket_url: String,
    pub ticket: String,
    #[serde(rename = "type")]
    pub kind: ConsoleKind,
    pub expires_in_seconds: u64,
}

/// Issue a console ticket for a running VPS: random, single-use, bound to the VPS and the
/// console type, and short-lived.
#[utoipa::path(post, path = "/v1/vms/{id}/console", tag = "console", params(VpsId),
    request_body = ConsoleRequest,
    responses((status = 200, description = "The ticket and where to use it", body = Envelope<ConsoleTicket>)))]
pub async fn console_create(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ConsoleRequest>,
) -> ApiResult {
    let id = vm_id(&id)?;
    let kind = req.kind.ok_or_else(|| {
        ApiError::new(
            ErrorCode::MissingFields,
            "type is required: novnc or serial",
        )
    })?;
    let ttl = req.ttl_seconds.unwrap_or(app.config.console.ticket_ttl_s);
    if !(1..=MAX_TTL_S).contains(&ttl) {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            format!("ttl_seconds must be between 1 and {MAX_TTL_S}"),
        ));
    }
    let (_, status) = app.vms.row_with_status(id).await?;
    // A deploying VM's console is useful too (watching it boot): what counts is that QEMU
    // runs it.
    let power = app.vms.hypervisor().power_state(id).await.ok().flatten();
    if !matches!(power, Some(PowerState::Running | PowerState::Paused)) {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "VPS {id} is {}; a console needs a running VPS",
                status.as_str()
            ),
        ));
    }
    let ticket = app
        .tickets
        .issue(Grant { vm: id, kind }, Duration::from_secs(ttl));
    let base = app.config.public_url();
    let websocket_url = format!(
        "{}/v1/console/ws?ticket={ticket}",
        base.replacen("http", "ws", 1)
    );
    let console_url = match kind {
        ConsoleKind::Novnc => format!("{base}/console/{ticket}"),
        // A serial console is a byte stream with no page of its own.
        ConsoleKind::Serial => websocket_url.clone(),
    };
    tracing::info!(vps = %id, kind = kind.as_str(), ttl_s = ttl, "console ticket issued");
    Ok(ok(ConsoleTicket {
        vps_id: id,
        console_url,
        websocket_url,
        ticket,
        kind,
        expires_in_seconds: ttl,
    }))
}

fn refused(e: TicketError) -> ApiError {
    ApiError::new(ErrorCode::InvalidTicket, e.to_string())
}

fn novnc_grant(app: &App, ticket: &str) -> Result<Grant, ApiError> {
    let grant = app.tickets.peek(ticket).map_err(refused)?;
    if grant.kind != ConsoleKind::Novnc {
        return Err(ApiError::new(
            ErrorCode::InvalidTicket,
            "this ticket is for a serial console, which has no page",
        ));
    }
    Ok(grant)
}

/// The noVNC page. Loading it does not use the ticket up.
#[utoipa::path(get, path = "/console/{ticket}", tag = "console", security(()),
    params(("ticket" = String, Path, description = "A noVNC console ticket")),
    responses(
        (status = 200, description = "The noVNC page", content_type = "text/html", body = String),
        (status = 403, description = "Unknown, expired or used ticket (`INVALID_TICKET`)", body = ErrorBody),
    ))]
pub async fn console_page(
    State(app): State<Arc<App>>,
    Path(ticket): Path<String>,
) -> Result<Response, ApiError> {
    novnc_grant(&app, &ticket)?;
    let novnc = &app.config.console.novnc_dir;
    if !novnc.join("core/rfb.js").is_file() {
        return Err(ApiError::new(
            ErrorCode::ConsoleFailed,
            format!(
                "noVNC is not installed at {} (console.novnc_dir; Debian: apt install novnc)",
                novnc.display()
            ),
        ));
    }
    let websocket_url = format!(
        "{}/v1/console/ws?ticket={ticket}",
        app.config.public_url().replacen("http", "ws", 1)
    );
    let page = console::page(&ticket, &websocket_url);
    let policy = console::page_policy(
        &page,
        console::origin(&websocket_url),
        &app.config.console.frame_ancestors,
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_owned()),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            // The ticket is in the URL: never send it on as a referrer.
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CONTENT_SECURITY_POLICY, policy),
        ],
        page,
    )
        .into_response())
}

/// A file of the noVNC client, for a page holding a valid ticket.
#[utoipa::path(get, path = "/console/{ticket}/novnc/{path}", tag = "console", security(()),
    params(
        ("ticket" = String, Path, description = "A noVNC console ticket"),
        ("path" = String, Path, description = "A file under the noVNC directory; may contain `/`"),
    ),
    responses(
        (status = 200, description = "The file", content(
            ("text/javascript"), ("text/html"), ("text/css"), ("application/json"),
            ("image/svg+xml"), ("image/png"), ("image/x-icon"), ("font/woff"), ("font/woff2"),
            ("font/ttf"), ("audio/ogg"), ("audio/mpeg"), ("application/octet-stream"))),
        (status = 403, description = "Unknown, expired or used ticket (`INVALID_TICKET`)", body = ErrorBody),
    ))]
pub async fn console_asset(
    State(app): State<Arc<App>>,
    Path((ticket, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    novnc_grant(&app, &ticket)?;
    let not_found = || ApiError::new(ErrorCode::RouteNotFound, format!("no file {path}"));
    let file = console::asset_path(&app.config.console.novnc_dir, &path).ok_or_else(not_found)?;
    let root = app.config.console.novnc_dir.clone();
    let rel = path.clone();
    let body = tokio::task::spawn_blocking(move || console::read_asset(&root, &rel))
        .await
        .ok()
        .flatten()
        .ok_or_else(not_found)?;
    let frame_ancestors = app.config.console.frame_ancestors.join(" ");
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                console::content_type(&file).to_owned(),
            ),
            (header::CACHE_CONTROL, "private, max-age=300".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (
                header::CONTENT_SECURITY_POLICY,
                format!("default-src 'none'; frame-ancestors {frame_ancestors}"),
            ),
        ],
        body,
    )
        .into_response())
}

/// The console WebSocket: checks the ticket, uses it up, opens the VM's VNC or serial
/// console and upgrades. Any failure is answered before the upgrade.
#[utoipa::path(get, path = "/v1/console/ws", tag = "console", security(()),
    params(
        ("ticket" = String, Query, description = "The ticket; it is used up by the upgrade"),
        ("vps_id" = Option<uuid::Uuid>, Query, description = "Refuse the ticket unless it is for this VPS"),
        ("type" = Option<ConsoleKind>, Query, description = "Refuse the ticket unless it is for this console type"),
    ),
    responses(
        (status = 101, description = "WebSocket (subprotocol `binary` when offered): raw RFB (novnc) or serial bytes"),
        (status = 403, description = "Unknown, expired, used or mismatched ticket (`INVALID_TICKET`)", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade (`WEBSOCKET_REQUIRED`)", body = ErrorBody),
    ))]
pub async fn console_ws(
    State(app): State<Arc<App>>,
    query: QueryMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ticket = query.get("ticket").unwrap_or("").to_owned();
    let grant = app.tickets.peek(&ticket).map_err(refused)?;
    // A client may say which VPS and console it expects; a ticket for another is refused.
    if query
        .get("vps_id")
        .is_some_and(|v| v.parse::<uuid::Uuid>().ok() != Some(grant.vm))
    {
        return Err(ApiError::new(
            ErrorCode::InvalidTicket,
            "the ticket is for another VPS",
        ));
    }
    if query.get("type").is_some_and(|t| t != grant.kind.as_str()) {
        return Err(ApiError::new(
            ErrorCode::InvalidTicket,
            "the ticket is for another console type",
        ));
    }
    let ws = ws.map_err(|_| websocket_required())?;
    let session = app
        .consoles
        .open(grant.vm)
        .map_err(|e| ApiError::new(ErrorCode::ConsoleLimit, e.to_string()))?;
    // The ticket is used up before the console is opened: of two uses of one ticket,
    // the loser must not get as far as taking over the winner's (serial) console.
    let grant = app.tickets.redeem(&ticket).map_err(refused)?;
    let backend = console::backend::open(app.vms.hypervisor().as_ref(), &grant)
        .await
        .map_err(|e| {
            tracing::warn!(vps = %grant.vm, error = %e, "cannot open console");
            match e {
                console::backend::OpenError::Hypervisor(e) => ApiError::new(
                    ErrorCode::ConsoleFailed,
                    format!("cannot open the console of VPS {}: {e}", grant.vm),
                ),
                other => ApiError::new(ErrorCode::ConsoleFailed, other.to_string()),
            }
        })?;
    tracing::info!(vps = %grant.vm, kind = grant.kind.as_str(), "console session opened");
    Ok(ws
        .protocols(["binary"])
        .max_message_size(console::proxy::MAX_CLIENT_MESSAGE)
        .max_frame_size(console::proxy::MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            let pump = console::backend::pump(socket, backend);
            // The VM was suspended, reinstalled or deleted: the session ends with it.
            let ended = tokio::select! {
                _ = pump => false,
                _ = session.ended.cancelled() => true,
            };
            drop(session);
            tracing::info!(vps = %grant.vm, kind = grant.kind.as_str(), ended_by_vm = ended,
                "console session closed");
        })
        .into_response())
}

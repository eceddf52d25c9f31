//! Live status: `GET /v1/vms/{id}/status`, its WebSocket stream, and `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use futures_util::{SinkExt, StreamExt};
use uuid::Uuid;

use super::error::ApiError;
use super::error::ErrorBody;
use super::extract::{vm_id, Path, QueryMap};
use super::openapi::VpsId;
use super::{ok, ApiResult, Envelope};
use crate::app::App;
use crate::errors::ErrorCode;
use crate::metrics::StatusDoc;
use crate::vm::VmError;

const DEFAULT_INTERVAL_MS: u64 = 1000;
const MIN_INTERVAL_MS: u64 = 200;
const MAX_INTERVAL_MS: u64 = 60_000;
const STALLED_READER: Duration = Duration::from_secs(30);

/// The live status of a VPS: QMP status, CPU, memory, disk and network counters.
#[utoipa::path(get, path = "/v1/vms/{id}/status", tag = "status", params(VpsId),
    responses((status = 200, description = "The status document", body = Envelope<StatusDoc>)))]
pub async fn vm_status(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    Ok(ok(app.vm_status(vm_id(&id)?).await?))
}

/// One status document (the `data` of `GET …/status`) per interval, as a text message,
/// until the client closes or the VM is deleted (close code 1000, reason "deleted").
#[utoipa::path(get, path = "/v1/vms/{id}/status/stream", tag = "status",
    params(VpsId,
        ("interval_ms" = Option<u64>, Query, minimum = 200, maximum = 60000,
            description = "Milliseconds between documents; default 1000"),
    ),
    responses(
        (status = 101, description = "WebSocket: a `StatusDoc` (JSON text message) per interval"),
        (status = 426, description = "Not a WebSocket upgrade (`WEBSOCKET_REQUIRED`)", body = ErrorBody),
    ))]
pub async fn vm_status_stream(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    query: QueryMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult {
    let id = vm_id(&id)?;
    let interval_ms = query.number("interval_ms")?.unwrap_or(DEFAULT_INTERVAL_MS);
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&interval_ms) {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            format!("interval_ms must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS}"),
        ));
    }
    // Unknown VMs are refused before the upgrade.
    app.vms.row_with_status(id).await?;
    let ws = ws.map_err(|_| websocket_required())?;
    // The client sends nothing but a close: small limits keep a hostile one from making
    // the agent buffer.
    Ok(ws
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| stream(app, id, Duration::from_millis(interval_ms), socket)))
}

pub fn websocket_required() -> ApiError {
    ApiError::new(
        ErrorCode::WebsocketRequired,
        "this route speaks WebSocket: send an HTTP/1.1 upgrade request",
    )
}

async fn stream(app: Arc<App>, id: Uuid, interval: Duration, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let reader = async {
        // Only a close (or a broken connection) matters from the client.
        while let Some(Ok(msg)) = rx.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let writer = async {
        let mut tick = tokio::time::interval(interval);
        // A slow reader makes sends wait; the ticks it misses are dropped, so what it gets
        // next is the newest sample, and nothing queues up in the agent.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            match app.vm_status_within(id, interval).await {
                Ok(doc) => {
                    let Ok(text) = serde_json::to_string(&doc) else {
                        continue;
                    };
                    // A reader that takes nothing for this long is gone.
                    let sent =
                        tokio::time::timeout(STALLED_READER, tx.send(Message::Text(text.into())))
                            .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        return;
                    }
                }
                Err(VmError::NotFound(_)) => {
                    let bye = tx.send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: "deleted".into(),
                    })));
                    let _ = tokio::time::timeout(STALLED_READER, bye).await;
                    return;
                }
                Err(e) => tracing::debug!(vps = %id, error = %e, "status stream: no sample"),
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    let _ = tokio::time::timeout(STALLED_READER, tx.close()).await;
}

/// Prometheus text exposition of the node, every VPS and the agent.
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses((status = 200, description = "Prometheus text format 0.0.4",
        content_type = "text/plain", body = String)))]
pub async fn metrics(State(app): State<Arc<App>>) -> ApiResult {
    let text = app.metrics_text().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            crate::metrics::prometheus::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

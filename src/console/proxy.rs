//! The WebSocket side of a console: raw RFB (or serial bytes) both ways.
//!
//! Each direction is one loop that does not read more until what it read has been
//! written, so a slow browser slows the VNC server down (TCP backpressure) instead of
//! making the agent buffer. Reads go into one growing `BytesMut`; each WebSocket message
//! takes the filled part without copying, and the buffer's spare capacity is reused, so a
//! bulk stream costs one allocation per large chunk, not one per message. When either
//! side ends, both are closed.

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hypervisor::ConsoleSession;

/// Bytes read from the console per message at most.
const CHUNK: usize = 256 * 1024;

/// Proxies `ws` to a byte stream (the VNC socket) until either side ends.
pub async fn pump_io<S>(ws: WebSocket, io: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let (mut reader, mut writer) = tokio::io::split(io);
    {
        let down = async {
            let mut buf = BytesMut::with_capacity(CHUNK);
            loop {
                buf.reserve(CHUNK);
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let msg = Message::Binary(buf.split().freeze());
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        let up = async {
            while let Some(Ok(msg)) = rx.next().await {
                let data = match msg {
                    Message::Binary(b) => b,
                    Message::Text(t) => bytes::Bytes::from(t.as_str().to_owned()),
                    Message::Close(_) => break,
                    // axum answers pings itself.
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if writer.write_all(&data).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        };
        tokio::pin!(down, up);
        tokio::select! {
            _ = &mut down => {}
            _ = &mut up => {}
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    let _ = tx.close().await;
}

/// Proxies `ws` to a serial console session until either side ends.
pub async fn pump_serial(ws: WebSocket, session: ConsoleSession) {
    let ConsoleSession {
        mut from_guest,
        to_guest,
    } = session;
    let (mut tx, mut rx) = ws.split();
    {
        let down = async {
            while let Some(data) = from_guest.recv().await {
                if tx.send(Message::Binary(data.into())).await.is_err() {
                    break;
                }
            }
        };
        let up = async {
            while let Some(Ok(msg)) = rx.next().await {
                let data = match msg {
                    Message::Binary(b) => b.to_vec(),
                    Message::Text(t) => t.as_str().as_bytes().to_vec(),
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if to_guest.send(data).await.is_err() {
                    break;
                }
            }
        };
        tokio::pin!(down, up);
        tokio::select! {
            _ = &mut down => {}
            _ = &mut up => {}
        }
    }
    // Dropping `to_guest` (with the `up` future) aborts the libvirt stream.
    let _ = tx.send(Message::Close(None)).await;
    let _ = tx.close().await;
}

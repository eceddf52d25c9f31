//! The WebSocket side of a console: raw RFB (or serial bytes) both ways.
//!
//! Each direction is one loop that does not read more until what it read has been
//! written, so a slow browser slows the VNC server down (TCP backpressure) instead of
//! making the agent buffer. Reads go into one growing `BytesMut`; each WebSocket message
//! takes the filled part without copying, and the buffer's spare capacity is reused, so a
//! bulk stream costs one allocation per large chunk, not one per message. When either
//! side ends, both are closed.
//!
//! Liveness: the agent pings the browser every `PING_EVERY`; a client that has sent
//! nothing (not even a pong) for `IDLE_LIMIT`, or that does not take a message within
//! `SEND_LIMIT`, is gone, and its session (with its libvirt fd and console slot) ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hypervisor::ConsoleSession;

/// Bytes read from the console per message at most.
const CHUNK: usize = 256 * 1024;
/// Largest message a console client may send (RFB client messages are tiny; a clipboard
/// paste is the big one).
pub const MAX_CLIENT_MESSAGE: usize = 1 << 20;
const PING_EVERY: Duration = Duration::from_secs(20);
const IDLE_LIMIT: Duration = Duration::from_secs(60);
const SEND_LIMIT: Duration = Duration::from_secs(30);

/// When the client was last heard from, shared by the two directions.
struct Heard {
    start: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Sends one message, giving up on a client that does not take it in time.
async fn send(tx: &mut SplitSink<WebSocket, Message>, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_LIMIT, tx.send(msg)).await,
        Ok(Ok(()))
    )
}

/// A ping when due; `false` when the client has been silent too long.
async fn keepalive(tx: &mut SplitSink<WebSocket, Message>, heard: &Heard) -> bool {
    heard.silent_for() < IDLE_LIMIT && send(tx, Message::Ping(bytes::Bytes::new())).await
}

async fn close(mut tx: SplitSink<WebSocket, Message>) {
    let _ = send(&mut tx, Message::Close(None)).await;
    let _ = tokio::time::timeout(SEND_LIMIT, tx.close()).await;
}

fn ping_timer() -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Proxies `ws` to a byte stream (the VNC socket) until either side ends.
pub async fn pump_io<S>(ws: WebSocket, io: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let (mut reader, mut writer) = tokio::io::split(io);
    let heard = Heard::new();
    {
        let down = async {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let mut ping = ping_timer();
            loop {
                buf.reserve(CHUNK);
                tokio::select! {
                    read = reader.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if !send(&mut tx, Message::Binary(buf.split().freeze())).await {
                                break;
                            }
                        }
                    },
                    _ = ping.tick() => {
                        if !keepalive(&mut tx, &heard).await {
                            break;
                        }
                    }
                }
            }
        };
        let up = async {
            while let Some(Ok(msg)) = rx.next().await {
                heard.now();
                let data = match msg {
                    Message::Binary(b) => b,
                    Message::Text(t) => bytes::Bytes::from(t.as_str().to_owned()),
                    Message::Close(_) => break,
                    // axum answers pings itself; pongs only prove the client is there.
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
    close(tx).await;
}

/// Proxies `ws` to a serial console session until either side ends.
pub async fn pump_serial(ws: WebSocket, session: ConsoleSession) {
    let ConsoleSession {
        mut from_guest,
        to_guest,
    } = session;
    let (mut tx, mut rx) = ws.split();
    let heard = Heard::new();
    {
        let down = async {
            let mut ping = ping_timer();
            loop {
                tokio::select! {
                    data = from_guest.recv() => match data {
                        Some(data) => {
                            if !send(&mut tx, Message::Binary(data.into())).await {
                                break;
                            }
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        if !keepalive(&mut tx, &heard).await {
                            break;
                        }
                    }
                }
            }
        };
        let up = async {
            while let Some(Ok(msg)) = rx.next().await {
                heard.now();
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
    close(tx).await;
}

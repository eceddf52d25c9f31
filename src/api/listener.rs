//! The TCP listener: HTTP/1.1 connections with the limits a listener that strangers can
//! reach needs (the console routes must be reachable from customers' browsers).
//!
//! How a connection is served:
//! 1. `accept`, then `Admission::admit`: a connection beyond `api.max_connections` in all,
//!    or beyond `api.max_connections_per_peer` from its address, is closed at once, before
//!    a byte is read. The per-peer cap is below the total, so one address holding all it
//!    may leaves room for the control plane's requests from another.
//! 2. hyper serves the connection with `api.header_timeout_ms` as its header read timeout.
//!    hyper starts that clock whenever the connection waits for a request head: a header
//!    trickled byte by byte, a connection that never sends one, and a keep-alive
//!    connection left idle are all closed when it runs out.
//! 3. The request body has `api.body_timeout_ms` to arrive in full (`api::read_body`).
//! 4. A WebSocket upgrade (consoles, status streams) leaves hyper's hands; the proxy then
//!    keeps its own idle and ping rules, and the connection keeps its admission until the
//!    socket closes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// What the listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_per_peer: usize,
}

impl Limits {
    pub fn from_config(api: &crate::config::ApiConfig) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(api.header_timeout_ms),
            max_connections: api.max_connections,
            max_per_peer: api.max_connections_per_peer,
        }
    }
}

/// Open connections, in all and per peer address.
#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Admits connections within the limits; each admitted one holds an `Admitted` until it
/// closes.
#[derive(Clone)]
pub struct Admission {
    counts: Arc<Mutex<Counts>>,
    limits: Limits,
}

/// One open connection's place; dropping it gives the place back.
pub struct Admitted {
    counts: Arc<Mutex<Counts>>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    Peer,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            counts: Arc::default(),
            limits,
        }
    }

    pub fn admit(&self, peer: IpAddr) -> Result<Admitted, Refused> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.max_connections {
            return Err(Refused::Total);
        }
        let n = c.per_peer.entry(peer).or_insert(0);
        if *n >= self.limits.max_per_peer {
            return Err(Refused::Peer);
        }
        *n += 1;
        c.total += 1;
        Ok(Admitted {
            counts: self.counts.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets requests in flight
/// finish (the caller bounds how long it waits).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let admission = Admission::new(limits);
    // Refusals are logged at most once a second, whatever their rate.
    let mut last_refusal_log = tokio::time::Instant::now() - Duration::from_secs(2);
    let mut refused_since_log = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, mostly: give others a moment to close theirs.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                drop(stream);
                refused_since_log += 1;
                if last_refusal_log.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        peer = %peer.ip(),
                        reason = ?why,
                        refused = refused_since_log,
                        open = admission.open(),
                        "connections refused (api.max_connections, api.max_connections_per_peer)"
                    );
                    last_refusal_log = tokio::time::Instant::now();
                    refused_since_log = 0;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Every request carries the peer's address, as `into_make_service_with_connect_info`
        // would add it.
        let svc = router
            .clone()
            .map_request(move |req: Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .with_upgrades();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Finish the request in flight, take no other.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            // An upgraded connection (a console) ends here too, as far as hyper and the
            // limits are concerned: the proxy holds the socket under its own rules.
            drop(admitted);
        });
    }
    while admission.open() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_peer: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(1),
            max_connections: total,
            max_per_peer: per_peer,
        }
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_share() {
        let a = Admission::new(limits(10, 2));
        let (x, y): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());

        let first = a.admit(x).unwrap();
        let _second = a.admit(x).unwrap();

        assert_eq!(a.admit(x).err(), Some(Refused::Peer));
        assert!(a.admit(y).is_ok(), "another peer is admitted");
        drop(first);
        assert!(a.admit(x).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn the_total_holds_across_peers() {
        let a = Admission::new(limits(3, 2));
        let held: Vec<_> = (1..=3)
            .map(|i| a.admit(format!("192.0.2.{i}").parse().unwrap()).unwrap())
            .collect();

        assert_eq!(
            a.admit("192.0.2.9".parse().unwrap()).err(),
            Some(Refused::Total)
        );
        drop(held);
        assert_eq!(a.open(), 0);
    }
}

//! Work inside the data-plane network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later. So a
//! short-lived OS thread enters the namespace (`setns`), creates the socket, and exits; the
//! agent's own threads never change namespace.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use super::NetworkError;

/// Runs `f` on a fresh OS thread inside `netns` (empty: the agent's own namespace).
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let path = if netns.is_empty() {
        None
    } else {
        Some(netns_path(netns)?)
    };
    let file =
        match &path {
            Some(p) => Some(std::fs::File::open(p).map_err(|e| {
                NetworkError::Namespace(format!("cannot open {}: {e}", p.display()))
            })?),
            None => None,
        };
    std::thread::Builder::new()
        .name("hvnode-netns".into())
        .spawn(move || {
            if let Some(file) = file {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            f()
        })
        .map_err(NetworkError::io("spawn netns thread"))?
        .join()
        .map_err(|_| NetworkError::Namespace("netns thread panicked".into()))?
        .map_err(NetworkError::io("work in network namespace"))
}

/// Opens a TCP connection to `addr` from inside `netns` (empty: the agent's namespace).
pub async fn tcp_connect(netns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let netns = netns.to_owned();
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            TcpStream::connect_timeout(&addr, timeout).map(|_| ())
        })
        .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
    .map_err(|_| std::io::Error::other("netns worker vanished"))?
}

fn netns_path(netns: &str) -> Result<PathBuf, NetworkError> {
    if netns.contains('/') || netns.starts_with('.') {
        return Err(NetworkError::Namespace(format!(
            "network namespace name {netns:?} is not a plain name"
        )));
    }
    Ok(PathBuf::from("/run/netns").join(netns))
}

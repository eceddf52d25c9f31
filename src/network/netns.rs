//! Socket work inside the data-plane network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later. So a
//! short-lived OS thread enters the namespace (`setns`), creates and connects the socket, and
//! exits; the agent's own threads never change namespace.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// Opens a TCP connection to `addr` from inside `netns` (empty: the agent's namespace).
pub async fn tcp_connect(netns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let netns = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("hvnode-netns".into())
        .spawn(move || {
            let result = enter(&netns).and_then(|()| TcpStream::connect_timeout(&addr, timeout));
            let _ = tx.send(result.map(|_| ()));
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("netns worker vanished"))?
}

/// Moves the calling thread into the named namespace.
fn enter(netns: &str) -> std::io::Result<()> {
    if netns.is_empty() {
        return Ok(());
    }
    let path = netns_path(netns)?;
    let file = std::fs::File::open(&path)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| std::io::Error::other(format!("setns {}: {e}", path.display())))
}

fn netns_path(netns: &str) -> std::io::Result<PathBuf> {
    if netns.contains('/') || netns.starts_with('.') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("network namespace name {netns:?} is not a plain name"),
        ));
    }
    Ok(PathBuf::from("/run/netns").join(netns))
}

//! The far end of a console session: the VM's VNC server (libvirt hands over a connected
//! graphics socket, no TCP port) or its serial console (a libvirt stream), opened for a
//! redeemed ticket, and the pump that joins it to the client's WebSocket.

use axum::extract::ws::WebSocket;

use super::{proxy, ConsoleKind, Grant};
use crate::hypervisor::{ConsoleSession, Hypervisor, HypervisorError};

pub enum Backend {
    Vnc(tokio::net::UnixStream),
    Serial(ConsoleSession),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("graphics socket: {0}")]
    Socket(std::io::Error),
}

/// Opens the console `grant` names.
pub async fn open(hv: &dyn Hypervisor, grant: &Grant) -> Result<Backend, OpenError> {
    match grant.kind {
        ConsoleKind::Novnc => {
            let fd = hv.open_graphics(grant.vm).await?;
            let std_sock = std::os::unix::net::UnixStream::from(fd);
            std_sock
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std_sock))
                .map(Backend::Vnc)
                .map_err(OpenError::Socket)
        }
        ConsoleKind::Serial => Ok(Backend::Serial(hv.open_serial(grant.vm).await?)),
    }
}

/// Carries the session both ways until either side ends it.
pub async fn pump(ws: WebSocket, backend: Backend) {
    match backend {
        Backend::Vnc(sock) => proxy::pump_io(ws, sock).await,
        Backend::Serial(s) => proxy::pump_serial(ws, s).await,
    }
}

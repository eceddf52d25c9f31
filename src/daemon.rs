//! `hvnode serve`: open the store, finish what a previous run left, serve both listeners,
//! talk to systemd, and stop cleanly.
//!
//! Stopping never touches VMs: they belong to libvirtd and outlive the agent. On SIGTERM the
//! listeners stop accepting, in-flight requests get a few seconds to finish, and tasks still
//! running are left to the journal: the next start resumes or unwinds them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::api::{self, UnixPeer};
use crate::app::App;
use crate::config::Config;
use crate::tasks::faults::FaultPoints;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: std::io::Error,
    },
    #[error("another agent is already serving {0}")]
    SocketBusy(String),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
}

impl DaemonError {
    /// The process's exit status: 3 when the store was refused (lost, emptied, corrupted,
    /// another store's), which restarting cannot fix (`RestartPreventExitStatus=3` in the
    /// unit); 1 for anything else.
    pub fn exit_status(&self) -> u8 {
        use crate::store::StoreError::*;
        match self {
            DaemonError::Store(Lost { .. } | Mismatch { .. } | Corrupt { .. }) => 3,
            _ => 1,
        }
    }
}

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Disks, seeds, memory snapshots and the store are the customers': 0600 whatever
    // umask the agent was started with (the unit sets 0077; a shell may not).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let faults = FaultPoints::from_env();
    if faults.is_armed() {
        tracing::warn!("test fault point armed: this agent will kill itself");
    }
    let app = Arc::new(App::open(config, faults)?);
    app.check_health().await;
    app.start_background();
    let report = app.vms.recover().await?;
    tracing::info!(
        resumed = report.resumed.len(),
        abandoned = report.abandoned.len(),
        unknown_domains = report.unknown_domains.len(),
        missing_domains = report.missing_domains.len(),
        autostart = report.autostart.len(),
        "startup reconciliation done"
    );
    app.vms.start_keeper(report.autostart.clone());

    let tcp = TcpListener::bind(app.config.api.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            what: app.config.api.listen.to_string(),
            source,
        })?;
    let unix = bind_socket(&app.config.api.socket, &app.config.api.socket_group).await?;
    tracing::info!(
        listen = %app.config.api.listen,
        socket = %app.config.api.socket.display(),
        accelerator = app.config.libvirt.accelerator.as_str(),
        "hvnode serving"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let router = api::router(app.clone());
    let tcp_server = tokio::spawn(api::listener::serve(
        tcp,
        router.clone(),
        api::listener::Limits::from_config(&app.config.api),
        stop_rx.clone(),
    ));
    let unix_server = {
        let mut rx = stop_rx.clone();
        let svc = router.into_make_service_with_connect_info::<UnixPeer>();
        tokio::spawn(async move {
            axum::serve(unix, svc)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        })
    };

    notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = start_watchdog();

    wait_for_signal().await;
    tracing::info!("stopping: VMs keep running");
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        let _ = tcp_server.await;
        let _ = unix_server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {DRAIN:?}; leaving them to the journal");
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = std::fs::remove_file(&app.config.api.socket);
    Ok(())
}

/// Binds the admin socket: refuses to steal it from a live agent, replaces a stale one,
/// and leaves it `0660` owned by the admin group.
async fn bind_socket(path: &Path, group: &str) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    let listen_err = |source| DaemonError::Listen {
        what: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::SocketBusy(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(listen_err)?;
    if !group.is_empty() {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => {
                nix::unistd::chown(path, None, Some(g.gid))
                    .map_err(|e| listen_err(std::io::Error::from(e)))?;
            }
            _ => tracing::warn!(group, "api.socket_group not found; socket stays root-only"),
        }
    }
    Ok(listener)
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asks for, read as libsystemd's `sd_watchdog_enabled`
/// does: `WATCHDOG_USEC`, for this process unless `WATCHDOG_PID` names another.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Pings systemd's watchdog at half its interval while the runtime is alive.
fn start_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
    )?;
    let period = interval / 2;
    tracing::info!(?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logging for a daemon: plain lines without timestamps or colour under systemd (journald
/// stamps them), timestamps on a terminal, or JSON.
pub fn init_tracing(level: &str, format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match (format, under_journal) {
        ("json", _) => builder.json().try_init(),
        ("auto", true) => builder.without_time().with_ansi(false).try_init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_read_as_libsystemd_reads_it() {
        let me = std::process::id().to_string();

        assert_eq!(
            watchdog_interval(Some("30000000"), None),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some(&me)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("1")), None);
        assert_eq!(watchdog_interval(Some("0"), None), None);
        assert_eq!(watchdog_interval(Some("soon"), None), None);
        assert_eq!(watchdog_interval(None, Some(&me)), None);
    }
}

//! `Hypervisor` over libvirt (`virt` crate), with self-healing connections.
//!
//! libvirtd serves at most `max_client_requests` (5 by default) calls of one connection at a
//! time, and a domain start takes hundreds of milliseconds, so one shared connection would
//! queue concurrent creates behind each other. A small pool of connections, used in turn,
//! lets them proceed side by side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::sys;

use super::{
    stats, ConsoleSession, DomainStats, DomainSummary, Hypervisor, HypervisorError, PowerState,
    Result, Versions, METADATA_NS,
};

/// One pooled connection and the domain handles looked up on it, under one lock, so that
/// a handle never outlives the connection it was looked up on: dropping the connection
/// clears its handles in the same critical section, and a handle looked up on a connection
/// that has meanwhile been replaced is never cached.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Connect>,
    /// Bumped whenever `conn` is dropped: what a caller checked out carries the generation
    /// it belongs to.
    generation: u64,
    /// Handles by UUID, so that a call on a domain seen before costs no lookup round trip
    /// (the QEMU driver finds a domain by its UUID, so a handle stays good across restarts
    /// and redefinitions). A handle whose domain is gone is dropped on the `NoDomain` it
    /// meets.
    domains: HashMap<Uuid, Domain>,
}

/// Handles kept per connection at most; beyond, the cache starts over.
const MAX_CACHED_DOMAINS: usize = 4096;

/// A connection checked out of a slot, with the generation it belongs to.
struct Checkout {
    conn: Connect,
    generation: u64,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot's connection, opened if there is none.
    fn checkout(&self, uri: &str) -> Result<Checkout> {
        let mut st = self.lock();
        if let Some(conn) = st.conn.as_ref() {
            return Ok(Checkout {
                conn: conn.clone(),
                generation: st.generation,
            });
        }
        // Opening blocks under the lock: the slot's other callers would only open a
        // connection of their own meanwhile.
        let conn = Connect::open(Some(uri)).map_err(|e| HypervisorError::Unavailable {
            uri: uri.to_owned(),
            message: e.message().to_owned(),
        })?;
        st.conn = Some(conn.clone());
        Ok(Checkout {
            conn,
            generation: st.generation,
        })
    }

    /// Drops the connection of generation `generation` with every handle looked up on it,
    /// unless another caller already replaced it.
    fn drop_connection(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            st.domains.clear();
            // Dropping the last reference closes the connection.
            st.conn = None;
            st.generation += 1;
        }
    }

    fn domain(&self, c: &Checkout, id: Uuid) -> std::result::Result<Domain, VirtError> {
        {
            let st = self.lock();
            if st.generation == c.generation {
                if let Some(d) = st.domains.get(&id) {
                    return Ok(d.clone());
                }
            }
        }
        let d = c.conn.lookup_domain_by_uuid_string(&id.to_string())?;
        let mut st = self.lock();
        if st.generation == c.generation {
            if st.domains.len() >= MAX_CACHED_DOMAINS {
                st.domains.clear();
            }
            st.domains.insert(id, d.clone());
        }
        Ok(d)
    }

    fn forget(&self, id: Uuid) {
        self.lock().domains.remove(&id);
    }
}

pub struct Libvirt {
    uri: String,
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
    /// Set when a call found libvirt unreachable; cleared by a probe that reached it on
    /// every connection. Health is `degraded` while it is set.
    failing: Arc<AtomicBool>,
}

impl Libvirt {
    /// Creates the client with `connections` pooled connections, each opened on first use.
    pub fn new(uri: &str, connections: usize) -> Libvirt {
        // libvirt's default error handler prints every error to stderr; we report them ourselves.
        virt::error::clear_error_callback();
        Libvirt {
            uri: uri.to_owned(),
            slots: (0..connections.max(1)).map(|_| Arc::default()).collect(),
            next: AtomicUsize::new(0),
            failing: Arc::default(),
        }
    }

    /// Runs `f` with a live connection on the blocking pool. A failure on a connection
    /// that is dead (whatever the error says) drops the connection with its handles and
    /// retries once on a fresh one, so a libvirtd restart costs one failed call at most.
    async fn with_conn<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connect) -> std::result::Result<T, VirtError> + Send + 'static,
    {
        self.on_slot(op, move |_, c| f(&c.conn)).await
    }

    async fn on_slot<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Slot, &Checkout) -> std::result::Result<T, VirtError> + Send + 'static,
    {
        let slot = self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()].clone();
        self.on(slot, op, f).await
    }

    async fn on<T, F>(&self, slot: Arc<Slot>, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Slot, &Checkout) -> std::result::Result<T, VirtError> + Send + 'static,
    {
        let uri = self.uri.clone();
        let failing = self.failing.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut last = None;
            for _attempt in 0..2 {
                let c = slot.checkout(&uri)?;
                match f(&slot, &c) {
                    Ok(v) => return Ok(v),
                    Err(e) if is_connection_error(&e) || !c.conn.is_alive().unwrap_or(false) => {
                        tracing::debug!(op, error = %e, "libvirt connection lost; reconnecting");
                        slot.drop_connection(c.generation);
                        last = Some(e);
                    }
                    Err(e) => return Err(classify(op, e)),
                }
            }
            Err(HypervisorError::Unavailable {
                uri,
                message: last.map(|e| e.to_string()).unwrap_or_default(),
            })
        })
        .await
        .map_err(|e| HypervisorError::Failed {
            op,
            message: format!("worker panicked: {e}"),
        })?;
        if let Err(HypervisorError::Unavailable { message, .. }) = &result {
            if !failing.swap(true, Ordering::Relaxed) {
                tracing::warn!(op, error = %message, "libvirt is unreachable");
            }
        }
        result
    }

    /// Like `with_conn` for one domain, mapping "no such domain" to `NoDomain`. A cached
    /// handle that meets "no such domain" is looked up once more before that is believed.
    async fn with_domain<T, F>(&self, op: &'static str, id: Uuid, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Domain) -> std::result::Result<T, VirtError> + Send + 'static,
    {
        self.on_slot(op, move |slot, c| match f(&slot.domain(c, id)?) {
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {
                slot.forget(id);
                f(&slot.domain(c, id)?)
            }
            other => other,
        })
        .await
        .map_err(|e| match e {
            HypervisorError::Failed { message, .. } if message.starts_with(NO_DOMAIN_MARK) => {
                HypervisorError::NoDomain(id)
            }
            other => other,
        })
    }

    /// Drops every connection's handle of `id` (its domain was undefined).
    fn forget_everywhere(&self, id: Uuid) {
        for slot in &self.slots {
            slot.forget(id);
        }
    }
}

const NO_DOMAIN_MARK: &str = "[no-domain] ";

/// The security drivers libvirt confines QEMU with, from its capabilities document
/// (`<host><secmodel><model>…`): `none` and `dac` do not keep one QEMU from another's disks.
fn security_models(capabilities: &str) -> Vec<String> {
    capabilities
        .split("<secmodel>")
        .skip(1)
        .filter_map(|block| {
            let block = block.split("</secmodel>").next()?;
            let model = block.split("<model>").nth(1)?.split("</model>").next()?;
            Some(model.trim().to_owned())
        })
        .collect()
}

fn is_connection_error(e: &VirtError) -> bool {
    e.code().is_any(vec![
        ErrorNumber::NoConnect,
        ErrorNumber::SystemError,
        ErrorNumber::Rpc,
        ErrorNumber::InvalidConn,
    ]) || e
        .domain()
        .is_any(vec![ErrorDomain::Rpc, ErrorDomain::Remote])
        && !e.code().is(ErrorNumber::NoDomain)
        || e.message().contains("client socket is closed")
}

fn classify(op: &'static str, e: VirtError) -> HypervisorError {
    if e.code().is(ErrorNumber::NoDomain) {
        return HypervisorError::Failed {
            op,
            message: format!("{NO_DOMAIN_MARK}{}", e.message()),
        };
    }
    HypervisorError::Failed {
        op,
        message: e.message().to_owned(),
    }
}

fn power_state(state: virt::domain::DomainStateEnum) -> PowerState {
    match state {
        virt::enumutil::Enum::Known(s) => match s {
            DomainState::Running | DomainState::Blocked => PowerState::Running,
            DomainState::Paused => PowerState::Paused,
            DomainState::Shutdown => PowerState::ShuttingDown,
            DomainState::Shutoff => PowerState::Shutoff,
            DomainState::Crashed => PowerState::Crashed,
            DomainState::PMSuspended => PowerState::PmSuspended,
            DomainState::NoState => PowerState::Unknown,
        },
        virt::enumutil::Enum::Unknown(_) => PowerState::Unknown,
    }
}

/// "9.0.0" from libvirt's packed `major * 1_000_000 + minor * 1000 + release`.
fn unpack_version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Ignores "already in that state" refusals so that lifecycle calls are idempotent.
fn ok_if_already(e: VirtError, already: &str) -> std::result::Result<(), VirtError> {
    if e.code().is(ErrorNumber::OperationInvalid) && e.message().contains(already) {
        Ok(())
    } else {
        Err(e)
    }
}

#[async_trait]
impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    async fn connected(&self) -> bool {
        self.with_conn("ping", |c| c.lib_version()).await.is_ok()
    }

    async fn probe(&self) -> Result<()> {
        for slot in &self.slots {
            self.on(slot.clone(), "ping", |_, c| c.conn.lib_version())
                .await?;
        }
        self.failing.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    async fn confined(&self) -> Result<bool> {
        let caps = self.with_conn("capabilities", |c| c.capabilities()).await?;
        Ok(security_models(&caps)
            .iter()
            .any(|m| m == "apparmor" || m == "selinux"))
    }

    async fn versions(&self) -> Result<Versions> {
        self.with_conn("version", |c| {
            Ok(Versions {
                libvirt: unpack_version(c.lib_version()?),
                qemu: unpack_version(c.hyp_version()?),
            })
        })
        .await
    }

    async fn define(&self, xml: String) -> Result<()> {
        self.with_conn("define", move |c| {
            c.define_domain_xml_flags(&xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
                .map(|_| ())
        })
        .await
    }

    async fn power_state(&self, id: Uuid) -> Result<Option<PowerState>> {
        match self
            .with_domain("state", id, |d| d.state().map(|(s, _)| power_state(s)))
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(HypervisorError::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn start(&self, id: Uuid) -> Result<()> {
        self.with_domain("start", id, |d| {
            d.create()
                .map(|_| ())
                .or_else(|e| ok_if_already(e, "already running"))
        })
        .await
    }

    async fn shutdown(&self, id: Uuid) -> Result<()> {
        self.with_domain("shutdown", id, |d| {
            d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                .or_else(|e| ok_if_already(e, "not running"))
        })
        .await
    }

    async fn destroy(&self, id: Uuid) -> Result<()> {
        self.with_domain("destroy", id, |d| {
            d.destroy().or_else(|e| ok_if_already(e, "not running"))
        })
        .await
    }

    async fn reset(&self, id: Uuid) -> Result<()> {
        self.with_domain("reset", id, |d| d.reset()).await
    }

    async fn suspend(&self, id: Uuid) -> Result<()> {
        self.with_domain("suspend", id, |d| d.suspend()).await
    }

    async fn resume(&self, id: Uuid) -> Result<()> {
        self.with_domain("resume", id, |d| d.resume()).await
    }

    async fn undefine(&self, id: Uuid) -> Result<()> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
        let result = match self
            .with_domain("undefine", id, move |d| d.undefine_flags(flags))
            .await
        {
            Err(HypervisorError::NoDomain(_)) => Ok(()),
            other => other,
        };
        self.forget_everywhere(id);
        result
    }

    async fn agent_command(
        &self,
        id: Uuid,
        command: serde_json::Value,
        timeout_s: i32,
    ) -> Result<serde_json::Value> {
        let text = command.to_string();
        let reply = self
            .with_domain("guest agent command", id, move |d| {
                d.qemu_agent_command(&text, timeout_s, 0)
            })
            .await
            .map_err(|e| match e {
                HypervisorError::Failed { message, .. } => {
                    HypervisorError::AgentUnavailable { id, message }
                }
                other => other,
            })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| HypervisorError::AgentUnavailable {
                id,
                message: format!("unparseable reply: {e}"),
            })?;
        Ok(parsed
            .get("return")
            .cloned()
            .unwrap_or(serde_json::Value::Null))
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        self.with_conn("list domains", |c| {
            let mut out = Vec::new();
            for d in c.list_all_domains(0)? {
                let Ok(uuid) = d.uuid_string() else { continue };
                let Ok(id) = uuid.parse::<Uuid>() else {
                    continue;
                };
                let managed = d
                    .metadata(
                        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                        Some(METADATA_NS),
                        0,
                    )
                    .is_ok();
                out.push(DomainSummary {
                    id,
                    name: d.name().unwrap_or_default(),
                    state: d
                        .state()
                        .map(|(s, _)| power_state(s))
                        .unwrap_or(PowerState::Unknown),
                    managed,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn domain_xml(&self, id: Uuid) -> Result<String> {
        self.with_domain("dumpxml", id, |d| d.xml_desc(0)).await
    }

    async fn attach_device_live(&self, id: Uuid, xml: String) -> Result<()> {
        self.with_domain("attach device", id, move |d| {
            d.attach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)
        })
        .await
    }

    async fn detach_device_live(&self, id: Uuid, xml: String) -> Result<()> {
        self.with_domain("detach device", id, move |d| {
            d.detach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)
        })
        .await
    }

    async fn grow_disk_live(&self, id: Uuid, target: &str, bytes: u64) -> Result<()> {
        let target = target.to_owned();
        self.with_domain("block resize", id, move |d| {
            d.block_resize(&target, bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        })
        .await
    }

    async fn all_stats(&self) -> Result<Vec<DomainStats>> {
        self.with_conn("domain stats", |c| {
            // SAFETY: c is an open connection for the duration of the call.
            unsafe { stats::collect(c.as_ptr()) }.map_err(|()| VirtError::last_error())
        })
        .await
    }

    async fn domain_states(&self) -> Result<Vec<DomainStats>> {
        self.with_conn("domain states", |c| {
            // SAFETY: c is an open connection for the duration of the call.
            unsafe { stats::states(c.as_ptr()) }.map_err(|()| VirtError::last_error())
        })
        .await
    }

    async fn power_states(&self) -> Result<HashMap<Uuid, PowerState>> {
        let all = self.domain_states().await?;
        Ok(all.into_iter().map(|s| (s.id, s.state)).collect())
    }

    async fn qmp_status(&self, id: Uuid) -> Result<String> {
        let reply = self
            .with_domain("query-status", id, |d| {
                d.qemu_monitor_command(
                    r#"{"execute":"query-status"}"#,
                    sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT,
                )
            })
            .await?;
        let parsed: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| HypervisorError::Failed {
                op: "query-status",
                message: format!("unparseable reply: {e}"),
            })?;
        parsed["return"]["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| HypervisorError::Failed {
                op: "query-status",
                message: format!("reply without a status: {reply}"),
            })
    }

    async fn start_paused(&self, id: Uuid) -> Result<()> {
        self.with_domain("start", id, |d| {
            d.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
                .map(|_| ())
                .or_else(|e| ok_if_already(e, "already running"))
        })
        .await
    }

    async fn qmp(&self, id: Uuid, command: serde_json::Value) -> Result<serde_json::Value> {
        let op = "monitor command";
        let text = command.to_string();
        let reply = self
            .with_domain(op, id, move |d| {
                d.qemu_monitor_command(&text, sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
            })
            .await?;
        let mut parsed: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| HypervisorError::Failed {
                op,
                message: format!("unparseable reply: {e}"),
            })?;
        if let Some(err) = parsed.get("error") {
            return Err(HypervisorError::Failed {
                op,
                message: err["desc"].as_str().unwrap_or("QEMU refused").to_owned(),
            });
        }
        Ok(parsed["return"].take())
    }

    async fn open_graphics(&self, id: Uuid) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        let fd = self
            .with_domain("open graphics", id, |d| {
                d.open_graphics_fd(0, sys::VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH)
            })
            .await?;
        // SAFETY: libvirt hands us a fresh descriptor that nothing else owns.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }

    async fn open_serial(&self, id: Uuid) -> Result<ConsoleSession> {
        let uri = self.uri.clone();
        tokio::task::spawn_blocking(move || serial::open(&uri, id))
            .await
            .map_err(|e| HypervisorError::Failed {
                op: "open console",
                message: format!("worker panicked: {e}"),
            })?
    }
}

/// Serial consoles over libvirt streams.
///
/// Each session gets its own connection (a blocked stream read must not hold up the pooled
/// connections' other calls) and two threads: one blocks in `virStreamRecv` and forwards
/// what the guest prints, the other forwards input. When the input side is dropped the
/// stream is aborted, which wakes the reader; when the guest side ends, the output channel
/// closes. The channels are bounded, so a slow client slows the reader down instead of
/// letting output pile up.
mod serial {
    use std::sync::Arc;

    use tokio::sync::mpsc;
    use uuid::Uuid;
    use virt::connect::Connect;
    use virt::stream::Stream;
    use virt::sys;

    use super::super::{ConsoleSession, HypervisorError, Result};

    struct Session {
        stream: Stream,
        // Keeps the connection open as long as the stream lives.
        _conn: Connect,
    }

    pub fn open(uri: &str, id: Uuid) -> Result<ConsoleSession> {
        let failed = |e: virt::error::Error| HypervisorError::Failed {
            op: "open console",
            message: e.message().to_owned(),
        };
        let conn = Connect::open(Some(uri)).map_err(|e| HypervisorError::Unavailable {
            uri: uri.to_owned(),
            message: e.message().to_owned(),
        })?;
        let dom = conn
            .lookup_domain_by_uuid_string(&id.to_string())
            .map_err(|_| HypervisorError::NoDomain(id))?;
        let stream = Stream::new(&conn, 0).map_err(failed)?;
        // FORCE: a console left open by a vanished client must not lock the customer out.
        dom.open_console(None, &stream, sys::VIR_DOMAIN_CONSOLE_FORCE)
            .map_err(failed)?;
        let session = Arc::new(Session {
            stream,
            _conn: conn,
        });
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(64);
        let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(64);

        let reader = session.clone();
        std::thread::Builder::new()
            .name("hvnode-serial-rx".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = reader.stream.recv(&mut buf) {
                    if n <= 0 || out_tx.blocking_send(buf[..n as usize].to_vec()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| HypervisorError::Failed {
                op: "open console",
                message: e.to_string(),
            })?;
        std::thread::Builder::new()
            .name("hvnode-serial-tx".into())
            .spawn(move || {
                'input: while let Some(data) = in_rx.blocking_recv() {
                    let mut rest = &data[..];
                    while !rest.is_empty() {
                        match session.stream.send(rest) {
                            Ok(n) if n > 0 => rest = &rest[n as usize..],
                            _ => break 'input,
                        }
                    }
                }
                // SAFETY: the stream is valid while `session` lives; aborting wakes the
                // reader blocked in virStreamRecv.
                unsafe { sys::virStreamAbort(session.stream.as_ptr()) };
            })
            .map_err(|e| HypervisorError::Failed {
                op: "open console",
                message: e.to_string(),
            })?;
        Ok(ConsoleSession {
            from_guest: out_rx,
            to_guest: in_tx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_models_are_read_from_the_capabilities() {
        let caps = "<capabilities><host><secmodel>\n<model>none</model>\n<doi>0</doi>\n\
                    </secmodel><secmodel><model>dac</model><doi>0</doi></secmodel></host>\
                    </capabilities>";

        assert_eq!(security_models(caps), vec!["none", "dac"]);
        assert_eq!(
            security_models("<secmodel><model>apparmor</model></secmodel>"),
            vec!["apparmor"]
        );
    }

    #[test]
    fn packed_versions_unpack() {
        assert_eq!(unpack_version(9_000_000), "9.0.0");
        assert_eq!(unpack_version(7_002_022), "7.2.22");
    }
}

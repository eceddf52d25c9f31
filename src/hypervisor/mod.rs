//! The hypervisor boundary: what hvnode asks of a VM monitor, in hvnode's own terms.
//!
//! `Hypervisor` is shaped by our domain (define this VM, start it, ask its guest agent),
//! not by libvirt's API surface; `libvirt::Libvirt` implements it over `virt`. Every libvirt
//! call blocks, so the implementation runs each one on tokio's blocking pool and keeps the
//! async runtime free. The connection is opened lazily and reopened after libvirtd restarts,
//! so the agent keeps serving (health reports `degraded`) while libvirt is away.

pub mod guest;
mod libvirt;
pub mod snapshot;
mod stats;

use async_trait::async_trait;
use uuid::Uuid;

pub use libvirt::Libvirt;

/// Namespace of the metadata element hvnode writes into every domain it defines; a domain
/// without it is not ours and is never touched.
pub const METADATA_NS: &str = "https://hvnode.dev/xmlns/vm/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    Running,
    Paused,
    ShuttingDown,
    Shutoff,
    Crashed,
    /// Guest-initiated suspend to RAM.
    PmSuspended,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    pub id: Uuid,
    pub name: String,
    pub state: PowerState,
    /// Carries hvnode's metadata element.
    pub managed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Versions {
    pub libvirt: String,
    pub qemu: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt is unavailable at {uri}: {message}")]
    Unavailable { uri: String, message: String },
    #[error("domain {0} is not defined in libvirt")]
    NoDomain(Uuid),
    #[error("guest agent of {id} did not answer: {message}")]
    AgentUnavailable { id: Uuid, message: String },
    #[error("libvirt {op} failed: {message}")]
    Failed { op: &'static str, message: String },
}

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// One running domain's counters, from libvirt's bulk stats call. Memory figures are KiB
/// as libvirt reports them; the guest-reported ones exist only when the guest's balloon
/// driver sends statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainStats {
    pub id: Uuid,
    pub state: PowerState,
    /// Total CPU time consumed by the domain, in nanoseconds.
    pub cpu_time_ns: u64,
    pub vcpus: u32,
    pub balloon_current_kib: u64,
    pub balloon_maximum_kib: u64,
    pub guest_available_kib: Option<u64>,
    pub guest_usable_kib: Option<u64>,
    pub guest_unused_kib: Option<u64>,
    pub rss_kib: Option<u64>,
    /// Summed over the domain's disks.
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    /// Whether this record carried block counters at all: libvirt leaves them out (rather
    /// than waiting) for a domain whose monitor is busy with another job.
    pub block_reported: bool,
    /// Summed over its NICs, from the guest's point of view (rx = received by the guest).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Why a shut-off domain stopped (`None` while it runs).
    pub off_reason: Option<OffReason>,
}

/// Why libvirt says a domain is shut off (`virDomainShutoffReason`). Only libvirtd's
/// memory holds it: after a libvirtd restart every inactive domain says `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffReason {
    Unknown,
    /// The guest powered off (on its own, or asked by ACPI).
    Shutdown,
    /// Someone pulled the plug (`virsh destroy`, or the agent's forced stop).
    Destroyed,
    /// QEMU ended without being asked: it crashed or was killed.
    Crashed,
    Migrated,
    Saved,
    /// QEMU failed to start.
    Failed,
    FromSnapshot,
    Daemon,
}

impl OffReason {
    pub fn from_libvirt(reason: u64) -> OffReason {
        match reason {
            1 => OffReason::Shutdown,
            2 => OffReason::Destroyed,
            3 => OffReason::Crashed,
            4 => OffReason::Migrated,
            5 => OffReason::Saved,
            6 => OffReason::Failed,
            7 => OffReason::FromSnapshot,
            8 => OffReason::Daemon,
            _ => OffReason::Unknown,
        }
    }
}

/// A serial console session: bytes from the guest arrive on `from_guest` (closed when the
/// console ends); bytes sent on `to_guest` reach it. Dropping `to_guest` ends the session.
pub struct ConsoleSession {
    pub from_guest: tokio::sync::mpsc::Receiver<Vec<u8>>,
    pub to_guest: tokio::sync::mpsc::Sender<Vec<u8>>,
}

#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn uri(&self) -> &str;
    /// Whether a working connection exists (or can be made now).
    async fn connected(&self) -> bool;
    /// One round trip on every pooled connection; the first failure if any fails.
    async fn probe(&self) -> Result<()>;
    /// Whether a call has found the hypervisor unreachable since the last probe that
    /// reached it on every connection.
    fn failing(&self) -> bool;
    /// Whether each VM's QEMU is confined by a mandatory access control driver (AppArmor,
    /// SELinux), so that one escaped guest cannot touch other VMs' disks.
    async fn confined(&self) -> Result<bool>;
    async fn versions(&self) -> Result<Versions>;
    /// Defines (or redefines) a persistent domain from its XML.
    async fn define(&self, xml: String) -> Result<()>;
    /// `None` when no domain with this UUID is defined.
    async fn power_state(&self, id: Uuid) -> Result<Option<PowerState>>;
    async fn start(&self, id: Uuid) -> Result<()>;
    /// Asks the guest to power off (ACPI power button).
    async fn shutdown(&self, id: Uuid) -> Result<()>;
    /// Pulls the plug.
    async fn destroy(&self, id: Uuid) -> Result<()>;
    async fn reset(&self, id: Uuid) -> Result<()>;
    async fn suspend(&self, id: Uuid) -> Result<()>;
    async fn resume(&self, id: Uuid) -> Result<()>;
    /// Removes the definition with its NVRAM and snapshot/checkpoint metadata. The domain
    /// must not be running.
    async fn undefine(&self, id: Uuid) -> Result<()>;
    /// Sends a QEMU guest agent command (`{"execute": …}`) and returns its `return` value.
    async fn agent_command(
        &self,
        id: Uuid,
        command: serde_json::Value,
        timeout_s: i32,
    ) -> Result<serde_json::Value>;
    async fn list_domains(&self) -> Result<Vec<DomainSummary>>;
    /// Every defined domain's power state and, when shut off, why; in one round trip.
    async fn domain_states(&self) -> Result<Vec<DomainStats>>;
    /// Every defined domain's power state, in one round trip.
    async fn power_states(&self) -> Result<std::collections::HashMap<Uuid, PowerState>> {
        Ok(self
            .list_domains()
            .await?
            .into_iter()
            .map(|d| (d.id, d.state))
            .collect())
    }
    /// The domain's current live XML.
    async fn domain_xml(&self, id: Uuid) -> Result<String>;
    /// Hot-plugs a device (`<interface>`…) into the running domain only; the persistent
    /// definition is the caller's to update.
    async fn attach_device_live(&self, id: Uuid, xml: String) -> Result<()>;
    async fn detach_device_live(&self, id: Uuid, xml: String) -> Result<()>;
    /// Grows a running domain's disk (`vda`, …) to `bytes`; the guest sees it at once.
    async fn grow_disk_live(&self, id: Uuid, target: &str, bytes: u64) -> Result<()>;
    /// Counters of every running domain in one call. Domains busy with another job are
    /// left out of this sweep instead of waiting for them.
    async fn all_stats(&self) -> Result<Vec<DomainStats>>;
    /// QEMU's own run state (`query-status`: "running", "paused", "io-error", …), through
    /// libvirt's monitor passthrough.
    async fn qmp_status(&self, id: Uuid) -> Result<String>;
    /// Starts the domain with its CPUs stopped (QEMU `-S`), e.g. to load a snapshot's memory
    /// before the guest runs.
    async fn start_paused(&self, id: Uuid) -> Result<()>;
    /// Runs a QMP command (`{"execute": …, "arguments": …}`) on the domain's monitor and
    /// returns its `return` value; a QMP error becomes `Failed` with QEMU's description.
    async fn qmp(&self, id: Uuid, command: serde_json::Value) -> Result<serde_json::Value>;
    /// A socket connected to the domain's VNC server (no TCP listener involved).
    async fn open_graphics(&self, id: Uuid) -> Result<std::os::fd::OwnedFd>;
    /// The domain's serial console, through a libvirt stream.
    async fn open_serial(&self, id: Uuid) -> Result<ConsoleSession>;
}

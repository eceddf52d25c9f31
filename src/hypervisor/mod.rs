//! The hypervisor boundary: what hvnode asks of a VM monitor, in hvnode's own terms.
//!
//! `Hypervisor` is shaped by our domain (define this VM, start it, ask its guest agent),
//! not by libvirt's API surface; `libvirt::Libvirt` implements it over `virt`. Every libvirt
//! call blocks, so the implementation runs each one on tokio's blocking pool and keeps the
//! async runtime free. The connection is opened lazily and reopened after libvirtd restarts,
//! so the agent keeps serving (health reports `degraded`) while libvirt is away.

mod libvirt;

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

#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn uri(&self) -> &str;
    /// Whether a working connection exists (or can be made now).
    async fn connected(&self) -> bool;
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
    /// The domain's current live XML.
    async fn domain_xml(&self, id: Uuid) -> Result<String>;
    /// Grows a running domain's disk (`vda`, …) to `bytes`; the guest sees it at once.
    async fn grow_disk_live(&self, id: Uuid, target: &str, bytes: u64) -> Result<()>;
}

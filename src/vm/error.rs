//! Everything a VM operation can fail with, each with its contract error code.

use uuid::Uuid;

use super::kind::TaskKind;
use super::state::Action;
use super::validate::ValidationError;
use crate::cloudinit::CloudInitError;
use crate::errors::ErrorCode;
use crate::hypervisor::HypervisorError;
use crate::network::ipam::IpamError;
use crate::storage::StorageError;
use crate::store::StoreError;

/// Which operation failed, for the `*_FAILED` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Deploy,
    Reinstall,
    Resize,
    Action(Action),
    Delete,
    Status,
    /// Addresses, private networks.
    Network,
    Snapshot,
}

impl Op {
    fn failed_code(self) -> ErrorCode {
        match self {
            Op::Deploy | Op::Reinstall | Op::Resize => ErrorCode::DeploymentFailed,
            Op::Action(Action::Start | Action::Resume) => ErrorCode::StartFailed,
            Op::Action(Action::Stop | Action::Suspend) => ErrorCode::StopFailed,
            Op::Action(Action::Restart | Action::Reset) => ErrorCode::RestartFailed,
            Op::Delete => ErrorCode::DeleteFailed,
            Op::Status => ErrorCode::StatusFailed,
            Op::Network => ErrorCode::NetworkFailed,
            Op::Snapshot => ErrorCode::SnapshotFailed,
        }
    }

    /// The operation a task of `kind` is: its failures carry this one's code, whichever
    /// layer they came from (a resize's stop fails it as a resize, not as a restart).
    pub fn of_task(kind: TaskKind) -> Op {
        match kind {
            TaskKind::Create => Op::Deploy,
            TaskKind::Reinstall => Op::Reinstall,
            TaskKind::Resize => Op::Resize,
            TaskKind::Start | TaskKind::Autostart | TaskKind::Autorestart => {
                Op::Action(Action::Start)
            }
            TaskKind::Stop => Op::Action(Action::Stop),
            TaskKind::Restart => Op::Action(Action::Restart),
            TaskKind::Reset => Op::Action(Action::Reset),
            TaskKind::Suspend => Op::Action(Action::Suspend),
            TaskKind::Resume => Op::Action(Action::Resume),
            TaskKind::Delete => Op::Delete,
            TaskKind::SnapshotCreate | TaskKind::SnapshotRollback | TaskKind::SnapshotDelete => {
                Op::Snapshot
            }
            TaskKind::IpAdd
            | TaskKind::IpRemove
            | TaskKind::IpMove
            | TaskKind::NetAttach
            | TaskKind::NetDetach => Op::Network,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Op::Deploy => "deploy",
            Op::Reinstall => "reinstall",
            Op::Resize => "resize",
            Op::Action(a) => a.as_str(),
            Op::Delete => "delete",
            Op::Status => "read status of",
            Op::Network => "change the network of",
            Op::Snapshot => "snapshot",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VPS {0} not found")]
    NotFound(Uuid),
    #[error("VPS {0} already exists with a different specification")]
    Exists(Uuid),
    #[error(
        "VPS id {id} begins with the same 12 hex digits as VPS {other}'s, which name its \
         network devices on this host; choose another id"
    )]
    IdConflict { id: Uuid, other: Uuid },
    #[error("{0}")]
    SnapshotQuota(String),
    #[error("task {task} is in progress on VPS {vm}; retry when it has finished")]
    TaskInProgress { vm: Uuid, task: Uuid },
    #[error("task {0} not found")]
    TaskNotFound(Uuid),
    #[error("{0}")]
    InvalidState(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    InsufficientCapacity(String),
    #[error(transparent)]
    Ip(#[from] IpamError),
    #[error("libvirt is unavailable: {0}")]
    HypervisorUnavailable(String),
    /// An operation failed for a reason the agent composed itself (a guest that never
    /// answered, a domain in the wrong state); `message` is safe to show to the client.
    #[error("failed to {} VPS: {message}", op.verb())]
    Failed { op: Op, message: String },
    /// An operation failed in the host's machinery (libvirt, qemu-img, the filesystem,
    /// netlink): `what` failed, because of `cause`. Both name host paths and library
    /// errors, so they go to the log (with the cause's whole chain, see
    /// `errors::chain`) and never into a customer's documents.
    #[error("failed to {} VPS on the host: {what}", op.verb())]
    Host {
        op: Op,
        what: String,
        #[source]
        cause: Cause,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// The agent's own store failed.
    #[error("the agent's store failed")]
    Store(#[from] StoreError),
    #[error("cancelled: the VPS is being deleted")]
    Cancelled,
    #[error("address {0} does not belong to this VPS")]
    IpNotFound(String),
    #[error("{0} is the VPS's primary address; it can only go with the VPS")]
    PrimaryIp(std::net::IpAddr),
    #[error("private network {0} not found")]
    NetworkNotFound(String),
    #[error("host network configuration failed: {0}")]
    NetworkFailed(String),
    #[error("{0}")]
    PoolExhausted(String),
    #[error("{0}")]
    NetworkExists(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("the VPS already has a snapshot named {0:?}")]
    SnapshotExists(String),
    #[error("the VPS already holds {0} snapshots (snapshots.max_per_vm); delete one first")]
    SnapshotLimit(usize),
    #[error("{0}")]
    InsufficientStorage(String),
    /// A failure read back from the task journal.
    #[error("{message}")]
    Recorded { code: ErrorCode, message: String },
}

impl VmError {
    pub fn code(&self) -> ErrorCode {
        match self {
            VmError::NotFound(_) => ErrorCode::VpsNotFound,
            VmError::Exists(_) => ErrorCode::VpsExists,
            VmError::IdConflict { .. } => ErrorCode::VpsIdConflict,
            VmError::SnapshotQuota(_) => ErrorCode::SnapshotQuotaExceeded,
            VmError::TaskInProgress { .. } => ErrorCode::TaskInProgress,
            VmError::TaskNotFound(_) => ErrorCode::TaskNotFound,
            VmError::InvalidState(_) => ErrorCode::InvalidState,
            VmError::Invalid(v) => v.code(),
            VmError::InsufficientCapacity(_) => ErrorCode::InsufficientCapacity,
            VmError::Ip(IpamError::Exhausted(_)) => ErrorCode::IpPoolExhausted,
            VmError::Ip(IpamError::InUse(_)) => ErrorCode::IpInUse,
            VmError::Ip(IpamError::OutsidePool { .. }) => ErrorCode::InvalidResources,
            VmError::HypervisorUnavailable(_) => ErrorCode::HypervisorUnavailable,
            VmError::Failed { op, .. } | VmError::Host { op, .. } => op.failed_code(),
            VmError::Internal(_) | VmError::Store(_) => ErrorCode::DeploymentFailed,
            VmError::Cancelled => ErrorCode::InvalidState,
            VmError::IpNotFound(_) => ErrorCode::IpNotFound,
            VmError::PrimaryIp(_) => ErrorCode::PrimaryIp,
            VmError::NetworkNotFound(_) => ErrorCode::NetworkNotFound,
            VmError::NetworkFailed(_) => ErrorCode::NetworkFailed,
            VmError::PoolExhausted(_) => ErrorCode::IpPoolExhausted,
            VmError::NetworkExists(_) => ErrorCode::NetworkExists,
            VmError::SnapshotNotFound(_) => ErrorCode::SnapshotNotFound,
            VmError::SnapshotExists(_) => ErrorCode::SnapshotExists,
            VmError::SnapshotLimit(_) => ErrorCode::SnapshotLimit,
            VmError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            VmError::Recorded { code, .. } => *code,
        }
    }

    /// What a customer may see of this error: the message for errors the agent composed,
    /// a short statement of what failed for errors from the host's machinery (whose
    /// details, host paths and library messages, go to the log only).
    pub fn public_message(&self) -> String {
        match self {
            // A full filesystem is the one host cause the control plane must act on
            // (move the VPS, page the operator), and it names nothing of the host.
            VmError::Host { op, .. } if crate::errors::chain(self).contains(NO_SPACE) => {
                format!(
                    "failed to {} VPS: no space left on the host's VM storage",
                    op.verb()
                )
            }
            VmError::Host { op, .. } => format!(
                "failed to {} VPS: the host could not complete the operation",
                op.verb()
            ),
            VmError::Internal(_) | VmError::Store(_) => {
                "the operation failed inside the agent".into()
            }
            VmError::HypervisorUnavailable(_) => "the hypervisor is unavailable".into(),
            VmError::NetworkFailed(_) => "the host's network could not be configured".into(),
            VmError::InsufficientStorage(_) => "no space left on the host's VM storage".into(),
            VmError::Recorded { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// Wraps a hypervisor failure of `op`; an unreachable libvirt stays recognisable.
    pub fn hypervisor(op: Op, e: HypervisorError) -> VmError {
        match e {
            HypervisorError::Unavailable { .. } => VmError::HypervisorUnavailable(e.to_string()),
            other => VmError::host(op, "a libvirt call failed", other),
        }
    }

    /// A failure of `op` in the host's machinery: `what` failed because of `cause`.
    pub fn host(op: Op, what: impl Into<String>, cause: impl Into<Cause>) -> VmError {
        VmError::Host {
            op,
            what: what.into(),
            cause: cause.into(),
        }
    }

    /// The same failure as part of a task of `kind`: a failure of an operation carries
    /// the task's code, whichever layer it came from.
    pub fn in_task(self, kind: TaskKind) -> VmError {
        let op = Op::of_task(kind);
        match self {
            VmError::Failed { message, .. } => VmError::Failed { op, message },
            VmError::Host { what, cause, .. } => VmError::Host { op, what, cause },
            other => other,
        }
    }

    /// Wraps a storage failure of `op`; a full filesystem says so.
    pub fn storage(op: Op, e: StorageError) -> VmError {
        let detail = crate::errors::chain(&e);
        if detail.contains(NO_SPACE) {
            return VmError::InsufficientStorage(format!("no space left on device: {detail}"));
        }
        VmError::host(op, "storage failed", e)
    }

    /// A host network failure: what the agent itself refuses (a kernel without 802.1Q) is
    /// said as is; netlink's errors stay in the log.
    pub fn network(e: crate::network::NetworkError) -> VmError {
        match e {
            crate::network::NetworkError::Unsupported(message) => VmError::Failed {
                op: Op::Network,
                message,
            },
            other => VmError::NetworkFailed(other.to_string()),
        }
    }

    pub fn cloud_init(op: Op, e: CloudInitError) -> VmError {
        VmError::host(op, "the cloud-init seed could not be written", e)
    }
}

/// What a host failure was caused by.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

const NO_SPACE: &str = "No space left on device";

impl crate::tasks::TaskFailure for VmError {
    fn code(&self) -> &'static str {
        VmError::code(self).as_str()
    }

    fn public_message(&self) -> String {
        VmError::public_message(self)
    }

    fn from_engine(err: StoreError) -> Self {
        err.into()
    }

    fn cancelled() -> Self {
        VmError::Cancelled
    }

    fn is_cancelled(&self) -> bool {
        matches!(self, VmError::Cancelled)
    }

    fn in_task(self, kind: &str) -> Self {
        match TaskKind::parse(kind) {
            Some(kind) => VmError::in_task(self, kind),
            None => self,
        }
    }

    fn from_record(code: &str, message: &str) -> Self {
        VmError::Recorded {
            code: ErrorCode::parse(code).unwrap_or(ErrorCode::DeploymentFailed),
            message: message.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shutdown_timed_out() -> HypervisorError {
        HypervisorError::Failed {
            op: "shutdown",
            message: "Timed out during operation: cannot acquire state change lock".into(),
        }
    }

    #[test]
    fn the_log_keeps_the_cause_and_the_customer_sees_none_of_it() {
        let e = VmError::hypervisor(Op::Action(Action::Stop), shutdown_timed_out());
        let logged = crate::errors::chain(&e);
        assert!(
            logged.starts_with("failed to stop VPS on the host"),
            "{logged}"
        );
        assert!(
            logged.contains("cannot acquire state change lock"),
            "{logged}"
        );
        assert!(
            std::error::Error::source(&e).is_some(),
            "the cause is kept typed"
        );
        let public = e.public_message();
        assert!(!public.contains("lock"), "{public}");
        assert_eq!(e.code(), ErrorCode::StopFailed);
    }

    #[test]
    fn a_task_s_kind_decides_the_code_of_a_failure_from_any_layer() {
        // A resize stops the guest with the power actions' plumbing: its failure there is
        // the resize's, not a restart's.
        let e = VmError::hypervisor(Op::Action(Action::Restart), shutdown_timed_out());
        assert_eq!(e.code(), ErrorCode::RestartFailed);
        let e = e.in_task(TaskKind::Resize);
        assert_eq!(e.code(), ErrorCode::DeploymentFailed);
        assert!(
            e.public_message().starts_with("failed to resize VPS"),
            "{e}"
        );
        let e = VmError::Failed {
            op: Op::Deploy,
            message: "no answer".into(),
        }
        .in_task(TaskKind::Stop);
        assert_eq!(e.code(), ErrorCode::StopFailed);
        // Errors that are not an operation's failure keep their own code.
        let e = VmError::InvalidState("busy".into()).in_task(TaskKind::Resize);
        assert_eq!(e.code(), ErrorCode::InvalidState);
        for kind in TaskKind::ALL {
            let code = VmError::host(Op::Deploy, "x", std::io::Error::other("y"))
                .in_task(*kind)
                .code();
            assert!(code.as_str().ends_with("_FAILED"), "{kind}: {code}");
        }
    }

    #[test]
    fn a_full_disk_is_said_even_under_a_wrapper() {
        let io = std::io::Error::other("write: No space left on device (os error 28)");
        let e = VmError::host(Op::Deploy, "the seed could not be written", io);
        assert!(e.public_message().contains("no space left"), "{e}");
    }
}

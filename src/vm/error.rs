//! Everything a VM operation can fail with, each with its contract error code.

use uuid::Uuid;

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
            Op::Deploy => ErrorCode::DeploymentFailed,
            Op::Action(Action::Start | Action::Resume) => ErrorCode::StartFailed,
            Op::Action(Action::Stop | Action::Suspend) => ErrorCode::StopFailed,
            Op::Action(Action::Restart | Action::Reset) => ErrorCode::RestartFailed,
            Op::Delete => ErrorCode::DeleteFailed,
            Op::Status => ErrorCode::StatusFailed,
            Op::Network => ErrorCode::NetworkFailed,
            Op::Snapshot => ErrorCode::SnapshotFailed,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Op::Deploy => "deploy",
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
    /// An operation failed on the host; `message` is safe to show to the client.
    #[error("failed to {} VPS: {message}", op.verb())]
    Failed { op: Op, message: String },
    #[error("internal error: {0}")]
    Internal(String),
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
            VmError::TaskInProgress { .. } => ErrorCode::TaskInProgress,
            VmError::TaskNotFound(_) => ErrorCode::TaskNotFound,
            VmError::InvalidState(_) => ErrorCode::InvalidState,
            VmError::Invalid(v) => v.code(),
            VmError::InsufficientCapacity(_) => ErrorCode::InsufficientCapacity,
            VmError::Ip(IpamError::Exhausted(_)) => ErrorCode::IpPoolExhausted,
            VmError::Ip(IpamError::InUse(_)) => ErrorCode::IpInUse,
            VmError::Ip(IpamError::OutsidePool { .. }) => ErrorCode::InvalidResources,
            VmError::HypervisorUnavailable(_) => ErrorCode::HypervisorUnavailable,
            VmError::Failed { op, .. } => op.failed_code(),
            VmError::Internal(_) => ErrorCode::DeploymentFailed,
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

    /// Wraps a hypervisor failure of `op`; an unreachable libvirt stays recognisable.
    pub fn hypervisor(op: Op, e: HypervisorError) -> VmError {
        match e {
            HypervisorError::Unavailable { .. } => VmError::HypervisorUnavailable(e.to_string()),
            other => VmError::Failed {
                op,
                message: other.to_string(),
            },
        }
    }

    pub fn storage(op: Op, e: StorageError) -> VmError {
        VmError::Failed {
            op,
            message: e.to_string(),
        }
    }

    pub fn cloud_init(op: Op, e: CloudInitError) -> VmError {
        VmError::Failed {
            op,
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for VmError {
    fn from(e: StoreError) -> VmError {
        VmError::Internal(e.to_string())
    }
}

impl crate::tasks::TaskFailure for VmError {
    fn code(&self) -> &'static str {
        VmError::code(self).as_str()
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

    fn from_record(code: &str, message: &str) -> Self {
        VmError::Recorded {
            code: ErrorCode::parse(code).unwrap_or(ErrorCode::DeploymentFailed),
            message: message.to_owned(),
        }
    }
}

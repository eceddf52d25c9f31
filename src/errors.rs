//! The contract's error codes (`node-api.md`), as domain facts.
//!
//! Domain errors say which code they are (`VmError::code`); task records store the code;
//! `api::error` maps each code to its HTTP status in one table. Codes are fixed by the
//! contract: add, never rename.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NoApiKey,
    InvalidApiKey,
    VpsNotFound,
    TaskNotFound,
    SnapshotNotFound,
    NetworkNotFound,
    IpNotFound,
    RouteNotFound,
    MethodNotAllowed,
    VpsExists,
    TaskInProgress,
    InvalidState,
    MissingFields,
    InvalidJson,
    InvalidHostname,
    PasswordTooShort,
    PasswordTooLong,
    PasswordWeak,
    InvalidSshKey,
    InvalidTemplate,
    InvalidName,
    InvalidResources,
    ConfirmationRequired,
    InsufficientCapacity,
    IpPoolExhausted,
    IpInUse,
    PrimaryIp,
    InvalidTicket,
    PayloadTooLarge,
    HypervisorUnavailable,
    StartFailed,
    StopFailed,
    RestartFailed,
    DeleteFailed,
    StatusFailed,
    ConsoleFailed,
    DeploymentFailed,
    /// Added to the contract's list: the host's network (bridges, tunnels, filters) could
    /// not be configured.
    NetworkFailed,
    /// Added: a WebSocket route was called without a WebSocket upgrade (426).
    WebsocketRequired,
    /// Added: the VM already has a snapshot of that name (409).
    SnapshotExists,
    /// Added: the VM holds the configured maximum of snapshots (409).
    SnapshotLimit,
    /// Added: the VM storage would fall below its free-space floor (507).
    InsufficientStorage,
    /// Added: taking, reverting to or deleting a snapshot failed on the host (500).
    SnapshotFailed,
    /// Added: a private network with the requested VNI or an overlapping subnet exists (409).
    NetworkExists,
    /// Added: the request body did not arrive within `api.body_timeout_ms` (408).
    RequestTimeout,
    /// Added: the node or the VM already has its maximum of console sessions open (409).
    ConsoleLimit,
    /// Added: a VM's snapshots would hold more than its allowance
    /// (`snapshots.max_percent_of_disk`) (409).
    SnapshotQuotaExceeded,
    /// Added: the VM's id shares the part its device names carry with another VM's (409).
    VpsIdConflict,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 48] = [
        ErrorCode::NoApiKey,
        ErrorCode::InvalidApiKey,
        ErrorCode::VpsNotFound,
        ErrorCode::TaskNotFound,
        ErrorCode::SnapshotNotFound,
        ErrorCode::NetworkNotFound,
        ErrorCode::IpNotFound,
        ErrorCode::RouteNotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::VpsExists,
        ErrorCode::TaskInProgress,
        ErrorCode::InvalidState,
        ErrorCode::MissingFields,
        ErrorCode::InvalidJson,
        ErrorCode::InvalidHostname,
        ErrorCode::PasswordTooShort,
        ErrorCode::PasswordTooLong,
        ErrorCode::PasswordWeak,
        ErrorCode::InvalidSshKey,
        ErrorCode::InvalidTemplate,
        ErrorCode::InvalidName,
        ErrorCode::InvalidResources,
        ErrorCode::ConfirmationRequired,
        ErrorCode::InsufficientCapacity,
        ErrorCode::IpPoolExhausted,
        ErrorCode::IpInUse,
        ErrorCode::PrimaryIp,
        ErrorCode::InvalidTicket,
        ErrorCode::PayloadTooLarge,
        ErrorCode::HypervisorUnavailable,
        ErrorCode::StartFailed,
        ErrorCode::StopFailed,
        ErrorCode::RestartFailed,
        ErrorCode::DeleteFailed,
        ErrorCode::StatusFailed,
        ErrorCode::ConsoleFailed,
        ErrorCode::DeploymentFailed,
        ErrorCode::NetworkFailed,
        ErrorCode::WebsocketRequired,
        ErrorCode::SnapshotExists,
        ErrorCode::SnapshotLimit,
        ErrorCode::InsufficientStorage,
        ErrorCode::SnapshotFailed,
        ErrorCode::NetworkExists,
        ErrorCode::RequestTimeout,
        ErrorCode::ConsoleLimit,
        ErrorCode::SnapshotQuotaExceeded,
        ErrorCode::VpsIdConflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoApiKey => "NO_API_KEY",
            ErrorCode::InvalidApiKey => "INVALID_API_KEY",
            ErrorCode::VpsNotFound => "VPS_NOT_FOUND",
            ErrorCode::TaskNotFound => "TASK_NOT_FOUND",
            ErrorCode::SnapshotNotFound => "SNAPSHOT_NOT_FOUND",
            ErrorCode::NetworkNotFound => "NETWORK_NOT_FOUND",
            ErrorCode::IpNotFound => "IP_NOT_FOUND",
            ErrorCode::RouteNotFound => "ROUTE_NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::VpsExists => "VPS_EXISTS",
            ErrorCode::TaskInProgress => "TASK_IN_PROGRESS",
            ErrorCode::InvalidState => "INVALID_STATE",
            ErrorCode::MissingFields => "MISSING_FIELDS",
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::InvalidHostname => "INVALID_HOSTNAME",
            ErrorCode::PasswordTooShort => "PASSWORD_TOO_SHORT",
            ErrorCode::PasswordTooLong => "PASSWORD_TOO_LONG",
            ErrorCode::PasswordWeak => "PASSWORD_WEAK",
            ErrorCode::InvalidSshKey => "INVALID_SSH_KEY",
            ErrorCode::InvalidTemplate => "INVALID_TEMPLATE",
            ErrorCode::InvalidName => "INVALID_NAME",
            ErrorCode::InvalidResources => "INVALID_RESOURCES",
            ErrorCode::ConfirmationRequired => "CONFIRMATION_REQUIRED",
            ErrorCode::InsufficientCapacity => "INSUFFICIENT_CAPACITY",
            ErrorCode::IpPoolExhausted => "IP_POOL_EXHAUSTED",
            ErrorCode::IpInUse => "IP_IN_USE",
            ErrorCode::PrimaryIp => "PRIMARY_IP",
            ErrorCode::InvalidTicket => "INVALID_TICKET",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::HypervisorUnavailable => "HYPERVISOR_UNAVAILABLE",
            ErrorCode::StartFailed => "START_FAILED",
            ErrorCode::StopFailed => "STOP_FAILED",
            ErrorCode::RestartFailed => "RESTART_FAILED",
            ErrorCode::DeleteFailed => "DELETE_FAILED",
            ErrorCode::StatusFailed => "STATUS_FAILED",
            ErrorCode::ConsoleFailed => "CONSOLE_FAILED",
            ErrorCode::DeploymentFailed => "DEPLOYMENT_FAILED",
            ErrorCode::NetworkFailed => "NETWORK_FAILED",
            ErrorCode::WebsocketRequired => "WEBSOCKET_REQUIRED",
            ErrorCode::SnapshotExists => "SNAPSHOT_EXISTS",
            ErrorCode::SnapshotLimit => "SNAPSHOT_LIMIT",
            ErrorCode::InsufficientStorage => "INSUFFICIENT_STORAGE",
            ErrorCode::SnapshotFailed => "SNAPSHOT_FAILED",
            ErrorCode::NetworkExists => "NETWORK_EXISTS",
            ErrorCode::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorCode::ConsoleLimit => "CONSOLE_LIMIT",
            ErrorCode::SnapshotQuotaExceeded => "SNAPSHOT_QUOTA_EXCEEDED",
            ErrorCode::VpsIdConflict => "VPS_ID_CONFLICT",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

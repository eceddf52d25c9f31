//! The contract's error codes (`node-api.md`), as domain facts.
//!
//! Domain errors say which code they are (`VmError::code`); task records store the code;
//! the answer's HTTP status and title come from the same row. Every code is declared once,
//! in the table below: its variant, its wire name, its HTTP status and its short title.
//! Codes are fixed by the contract: add, never rename.

/// Declares the codes: `Variant = ("WIRE_NAME", http_status, "Title")`, in contract order.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = ($name:literal, $status:literal, $title:literal),)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The wire name, as `error_code` carries it.
            pub fn as_str(self) -> &'static str {
                self.describe().0
            }

            /// The wire name, the HTTP status of an answer with this code, and its title
            /// (the answer's `error`).
            pub fn describe(self) -> (&'static str, u16, &'static str) {
                match self {
                    $(ErrorCode::$variant => ($name, $status, $title),)*
                }
            }
        }
    };
}

error_codes! {
    NoApiKey = ("NO_API_KEY", 401, "API key required"),
    InvalidApiKey = ("INVALID_API_KEY", 401, "Invalid API key"),
    VpsNotFound = ("VPS_NOT_FOUND", 404, "VPS not found"),
    TaskNotFound = ("TASK_NOT_FOUND", 404, "Task not found"),
    SnapshotNotFound = ("SNAPSHOT_NOT_FOUND", 404, "Snapshot not found"),
    NetworkNotFound = ("NETWORK_NOT_FOUND", 404, "Network not found"),
    IpNotFound = ("IP_NOT_FOUND", 404, "IP not found"),
    RouteNotFound = ("ROUTE_NOT_FOUND", 404, "Route not found"),
    MethodNotAllowed = ("METHOD_NOT_ALLOWED", 405, "Method not allowed"),
    VpsExists = ("VPS_EXISTS", 409, "VPS already exists"),
    TaskInProgress = ("TASK_IN_PROGRESS", 409, "Task in progress"),
    InvalidState = ("INVALID_STATE", 409, "Invalid state"),
    MissingFields = ("MISSING_FIELDS", 400, "Missing fields"),
    InvalidJson = ("INVALID_JSON", 400, "Invalid request body"),
    InvalidHostname = ("INVALID_HOSTNAME", 400, "Invalid hostname"),
    PasswordTooShort = ("PASSWORD_TOO_SHORT", 400, "Password too short"),
    PasswordTooLong = ("PASSWORD_TOO_LONG", 400, "Password too long"),
    PasswordWeak = ("PASSWORD_WEAK", 400, "Password too weak"),
    InvalidSshKey = ("INVALID_SSH_KEY", 400, "Invalid SSH key"),
    InvalidTemplate = ("INVALID_TEMPLATE", 400, "Invalid template"),
    InvalidName = ("INVALID_NAME", 400, "Invalid name"),
    InvalidResources = ("INVALID_RESOURCES", 400, "Invalid resources"),
    ConfirmationRequired = ("CONFIRMATION_REQUIRED", 400, "Confirmation required"),
    InsufficientCapacity = ("INSUFFICIENT_CAPACITY", 409, "Insufficient capacity"),
    IpPoolExhausted = ("IP_POOL_EXHAUSTED", 409, "IP pool exhausted"),
    IpInUse = ("IP_IN_USE", 409, "IP in use"),
    PrimaryIp = ("PRIMARY_IP", 400, "Primary IP"),
    InvalidTicket = ("INVALID_TICKET", 403, "Invalid ticket"),
    PayloadTooLarge = ("PAYLOAD_TOO_LARGE", 413, "Payload too large"),
    HypervisorUnavailable = ("HYPERVISOR_UNAVAILABLE", 503, "Hypervisor unavailable"),
    StartFailed = ("START_FAILED", 500, "Start failed"),
    StopFailed = ("STOP_FAILED", 500, "Stop failed"),
    RestartFailed = ("RESTART_FAILED", 500, "Restart failed"),
    DeleteFailed = ("DELETE_FAILED", 500, "Delete failed"),
    StatusFailed = ("STATUS_FAILED", 500, "Status failed"),
    ConsoleFailed = ("CONSOLE_FAILED", 500, "Console failed"),
    DeploymentFailed = ("DEPLOYMENT_FAILED", 500, "Deployment failed"),
    /// Added to the contract's list: the host's network (bridges, tunnels, filters) could
    /// not be configured.
    NetworkFailed = ("NETWORK_FAILED", 500, "Network configuration failed"),
    /// Added: a WebSocket route was called without a WebSocket upgrade (426).
    WebsocketRequired = ("WEBSOCKET_REQUIRED", 426, "WebSocket upgrade required"),
    /// Added: the VM already has a snapshot of that name (409).
    SnapshotExists = ("SNAPSHOT_EXISTS", 409, "Snapshot exists"),
    /// Added: the VM holds the configured maximum of snapshots (409).
    SnapshotLimit = ("SNAPSHOT_LIMIT", 409, "Snapshot limit reached"),
    /// Added: the VM storage would fall below its free-space floor (507).
    InsufficientStorage = ("INSUFFICIENT_STORAGE", 507, "Insufficient storage"),
    /// Added: taking, reverting to or deleting a snapshot failed on the host (500).
    SnapshotFailed = ("SNAPSHOT_FAILED", 500, "Snapshot failed"),
    /// Added: a private network with the requested VNI or an overlapping subnet exists (409).
    NetworkExists = ("NETWORK_EXISTS", 409, "Network exists"),
    /// Added: the request body did not arrive within `api.body_timeout_ms` (408).
    RequestTimeout = ("REQUEST_TIMEOUT", 408, "Request timeout"),
    /// Added: the node or the VM already has its maximum of console sessions open (409).
    ConsoleLimit = ("CONSOLE_LIMIT", 409, "Console session limit reached"),
    /// Added: a VM's snapshots would hold more than its allowance
    /// (`snapshots.max_percent_of_disk`) (409).
    SnapshotQuotaExceeded = ("SNAPSHOT_QUOTA_EXCEEDED", 409, "Snapshot quota exceeded"),
    /// Added: the VM's id shares the part its device names carry with another VM's (409).
    VpsIdConflict = ("VPS_ID_CONFLICT", 409, "VPS id conflict"),
    /// Added: the token is valid but lacks the scope the route needs (403).
    InsufficientScope = ("INSUFFICIENT_SCOPE", 403, "Insufficient scope"),
    /// Added: the token's `expires_at` has passed (401).
    ExpiredApiKey = ("EXPIRED_API_KEY", 401, "Expired API key"),
    /// Added: the token may not be used from the caller's address (403).
    IpNotAllowed = ("IP_NOT_ALLOWED", 403, "IP not allowed"),
}

impl ErrorCode {
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// The HTTP status of an answer with this code.
    pub fn status(self) -> u16 {
        self.describe().1
    }

    /// The short `error` text of an answer with this code.
    pub fn title(self) -> &'static str {
        self.describe().2
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `err` with every cause under it, `: `-separated, for the log: a wrapped libvirt or I/O
/// error keeps its own words.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Transparent wrappers repeat their source's words.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_has_one_name_a_real_status_and_a_title() {
        let mut names = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let (name, status, title) = code.describe();
            assert!(names.insert(name), "{name} is declared twice");
            assert!((400..600).contains(&status), "{name}: {status}");
            assert!(!title.is_empty(), "{name} has a title");
            assert_eq!(ErrorCode::parse(name), Some(*code));
        }
    }
}

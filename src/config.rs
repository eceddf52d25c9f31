//! Configuration: one TOML file where every key has a default, overridable per key by
//! environment variables.
//!
//! Precedence, lowest first: built-in defaults → the TOML file → `HVNODE_<SECTION>__<KEY>`
//! environment variables (`HVNODE_API__LISTEN=0.0.0.0:8474`,
//! `HVNODE_NETWORK__POOL__GATEWAY=…`). Values in the environment are parsed as TOML values
//! when they parse (`8`, `true`, `["a","b"]`) and taken as strings otherwise. Unknown keys are
//! errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(
        "config file {path} holds secrets and is readable by other users (mode {mode:o}); \
         chmod 0600 or 0640 it"
    )]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error(
        "config file {path} could be changed by someone other than root (owner uid {uid}, \
         mode {mode:o}); it names programs the agent runs as root: chown root and chmod \
         0600 or 0640 it"
    )]
    Writable { path: PathBuf, uid: u32, mode: u32 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub api: ApiConfig,
    pub libvirt: LibvirtConfig,
    pub storage: StorageConfig,
    pub network: NetworkConfig,
    pub tasks: TasksConfig,
    pub capacity: CapacityConfig,
    pub webhooks: WebhooksConfig,
    pub reconcile: ReconcileConfig,
    pub metrics: MetricsConfig,
    pub console: ConsoleConfig,
    pub snapshots: SnapshotsConfig,
    pub boot: BootConfig,
    pub autorestart: AutorestartConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// TCP listener for the control plane.
    pub listen: SocketAddr,
    /// Unix socket for local admins and `hvnode ctl`.
    pub socket: PathBuf,
    /// Group (besides root) allowed on the Unix socket; empty means root only.
    pub socket_group: String,
    /// Hex SHA-256 hashes of the accepted bearer tokens: each has every scope.
    pub token_sha256: Vec<String>,
    /// Named tokens with scopes, an optional expiry and optional source networks
    /// (`[[api.tokens]]`).
    pub tokens: Vec<TokenConfig>,
    /// Base URL the control plane and browsers use to reach this agent (console and
    /// deployment URLs). Empty: `http://<listen>`.
    pub public_url: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's head, counted from when the connection is
    /// ready for one: a header trickled byte by byte, a connection that sends nothing and
    /// a keep-alive connection left idle are all closed after it.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's whole body once its head arrived (408).
    pub body_timeout_ms: u64,
    /// Connections open at once on the TCP listener; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one peer address, so that one client (or one
    /// attacker) cannot take the control plane's share.
    pub max_connections_per_peer: usize,
}

/// One named bearer token (`[[api.tokens]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it, as logs name the caller.
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
    /// What it may do: `vps:read`, `vps:write`, `vps:delete`, `console`, `metrics`,
    /// `admin` (everything).
    pub scopes: Vec<String>,
    /// RFC 3339 time after which it is refused (401 `EXPIRED_API_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Networks it may be used from (CIDR); empty: anywhere (403 `IP_NOT_ALLOWED`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<String>,
}

/// The scopes a token may hold.
pub const TOKEN_SCOPES: &[&str] = &[
    "vps:read",
    "vps:write",
    "vps:delete",
    "console",
    "metrics",
    "admin",
];

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8474),
            socket: PathBuf::from("/run/hvnode/hvnode.sock"),
            socket_group: String::new(),
            token_sha256: Vec::new(),
            tokens: Vec::new(),
            public_url: String::new(),
            max_body_bytes: 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_connections: 2048,
            max_connections_per_peer: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    pub uri: String,
    /// `kvm` on real hosts; `tcg` (software emulation) where nested KVM is unavailable.
    pub accelerator: Accelerator,
    pub machine: String,
    /// UEFI firmware (read-only code) and the template for each VM's variable store.
    pub ovmf_code: PathBuf,
    pub ovmf_vars: PathBuf,
    /// `<cpu mode=…>`; empty leaves QEMU's default model (required under TCG).
    pub cpu_mode: String,
    /// Connections to libvirtd used in turn (libvirtd runs 5 calls per connection at once).
    pub connections: usize,
    /// Report `degraded` when libvirt confines QEMU with no AppArmor or SELinux profile
    /// (security model `none`). A test rig without either sets it to false.
    pub require_confinement: bool,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            uri: "qemu:///system".into(),
            accelerator: Accelerator::Kvm,
            machine: "q35".into(),
            ovmf_code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            ovmf_vars: PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"),
            cpu_mode: "host-model".into(),
            connections: 4,
            require_confinement: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    /// qcow2 overlay backed by the template: instant, shares the template's blocks.
    Linked,
    /// Full copy of the template: independent of it, slower to create.
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Template images and their manifests (`templates/*.toml`).
    pub image_dir: PathBuf,
    /// One directory per VM: disk overlay and cloud-init seed.
    pub vm_dir: PathBuf,
    /// The agent's SQLite journal and records.
    pub state_db: PathBuf,
    pub clone: CloneMode,
    pub qemu_img: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            image_dir: PathBuf::from("/var/lib/hvnode/images"),
            vm_dir: PathBuf::from("/var/lib/hvnode/vms"),
            state_db: PathBuf::from("/var/lib/hvnode/hvnode.db"),
            clone: CloneMode::Linked,
            qemu_img: PathBuf::from("/usr/bin/qemu-img"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Named network namespace (`/run/netns/NAME`) that holds the data plane (bridges, taps,
    /// guest addresses); empty means the agent's own namespace.
    pub netns: String,
    /// Public bridge every VM's first NIC is attached to; created when absent.
    pub bridge: String,
    /// Host interface enslaved to the public bridge (the uplink); empty: none.
    pub uplink: String,
    /// Anti-spoofing filters on every VM NIC.
    pub filter: bool,
    /// The nftables table (bridge family) holding them.
    pub filter_table: String,
    /// Delete hvnode's devices (IFBs, private bridges and tunnels) that no VM or network
    /// in the store needs, when reconciling.
    pub remove_leftovers: bool,
    /// First two characters of every VM tap's name (`<prefix><12 hex of the id><NIC>`).
    /// The filter drops whatever arrives on a port with this prefix that has no chain of
    /// its own, so the prefix must be this agent's alone on the host.
    pub tap_prefix: String,
    /// How long a guest has to let go of a hot-unplugged NIC before the detach fails.
    pub unplug_timeout_s: u64,
    /// Extra addresses one VM may hold besides its primary.
    pub max_extra_ips: usize,
    /// The public IPv4 pool.
    pub pool: IpPoolConfig,
    /// An optional public IPv6 pool: VMs then get a primary IPv6 address too.
    pub pool6: Option<IpPoolConfig>,
    pub private: PrivateNetworkConfig,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            netns: String::new(),
            bridge: "br-public".into(),
            uplink: String::new(),
            filter: true,
            filter_table: "hvnode".into(),
            remove_leftovers: true,
            tap_prefix: "vh".into(),
            unplug_timeout_s: 60,
            max_extra_ips: 8,
            pool: IpPoolConfig::default(),
            pool6: None,
            private: PrivateNetworkConfig::default(),
        }
    }
}

/// Customers' private networks: an isolated L2 segment each, a bridge per network on this
/// host, carried to other hosts by VXLAN (VNI = network).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivateNetworkConfig {
    /// Subnets handed to networks created without one.
    pub pool: IpNetwork,
    pub prefix_len: u8,
    /// VNIs handed to networks created without one (inclusive).
    pub vni_first: u32,
    pub vni_last: u32,
    /// Underlay interface for VXLAN; empty: networks stay on this host.
    pub underlay: String,
    /// This host's underlay address (VXLAN source).
    pub local_ip: Option<IpAddr>,
    /// Other hypervisors' underlay addresses: broadcast and unknown traffic is replicated
    /// to each (no multicast needed).
    pub peers: Vec<IpAddr>,
    /// MTU of private bridges and VXLAN devices (underlay MTU minus 50).
    pub mtu: u32,
    /// 802.1Q on a trunk uplink instead of VXLAN (needs kernel 802.1Q support).
    pub vlan_trunk: String,
}

impl Default for PrivateNetworkConfig {
    fn default() -> Self {
        Self {
            pool: "10.240.0.0/16".parse().expect("static CIDR"),
            prefix_len: 24,
            vni_first: 10_000,
            vni_last: 19_999,
            underlay: String::new(),
            local_ip: None,
            peers: Vec::new(),
            mtu: 1450,
            vlan_trunk: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpPoolConfig {
    /// The public subnet, e.g. `203.0.113.0/24`.
    pub cidr: IpNetwork,
    pub gateway: IpAddr,
    /// First and last address handed to VMs (inclusive).
    pub first: IpAddr,
    pub last: IpAddr,
    /// Addresses inside the range that are never handed out.
    pub reserved: Vec<IpAddr>,
    pub dns: Vec<IpAddr>,
}

impl Default for IpPoolConfig {
    fn default() -> Self {
        Self {
            cidr: "192.0.2.0/24".parse().expect("static CIDR"),
            gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            first: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            last: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 250)),
            reserved: Vec::new(),
            dns: vec![
                IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
                IpAddr::V4(Ipv4Addr::new(9, 9, 9, 9)),
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Tasks running at once across all VMs (tasks on one VM always run one at a time).
    pub max_concurrent: usize,
    /// How long `wait_for_guest_agent` waits for `guest-ping` to answer.
    pub guest_agent_timeout_s: u64,
    /// How long `verify_connectivity` waits for TCP 22 on the primary address.
    pub connectivity_timeout_s: u64,
    /// Skip the TCP check (hosts whose data-plane namespace has no route to guests).
    pub verify_connectivity: bool,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            guest_agent_timeout_s: 600,
            connectivity_timeout_s: 300,
            verify_connectivity: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// vCPUs that may be allocated per host core.
    pub cpu_overcommit: f64,
    /// RAM that may be allocated as a fraction of host RAM after the reserve.
    pub ram_overcommit: f64,
    /// RAM kept for the host itself.
    pub ram_reserved_mb: u64,
    /// Disk that may be allocated as a multiple of the VM storage's size.
    pub disk_overcommit: f64,
    /// Limits for a single VM.
    pub max_cpu_cores: u32,
    pub max_ram_mb: u64,
    pub max_disk_gb: u64,
    pub min_ram_mb: u64,
    /// Most VMs this host takes; 0: no limit besides CPU, RAM and disk.
    pub max_vms: u64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            cpu_overcommit: 4.0,
            ram_overcommit: 1.0,
            ram_reserved_mb: 1024,
            disk_overcommit: 1.0,
            max_cpu_cores: 64,
            max_ram_mb: 512 * 1024,
            max_disk_gb: 4096,
            min_ram_mb: 256,
            max_vms: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Delay before the first retry; it doubles on each failure.
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts.
    pub max_backoff_s: u64,
    /// Age after which an undelivered event is abandoned.
    pub max_age_s: u64,
    /// Per-request timeout.
    pub timeout_s: u64,
    /// Deliver to loopback, private, link-local (cloud metadata), CGNAT, unique-local and
    /// other non-public addresses too. Off: webhook URLs come from customers, and the
    /// node must not become their way into the management network.
    pub allow_private: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 2000,
            max_backoff_s: 300,
            max_age_s: 86_400,
            timeout_s: 10,
            allow_private: false,
        }
    }
}

/// What startup does when the store and libvirt disagree. Both are always reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Remove hvnode domains (with their files under `storage.vm_dir`) that no record knows.
    pub remove_unknown_domains: bool,
    /// Remove records (and their addresses) of deployed VMs whose domain is gone.
    pub remove_orphan_records: bool,
}

/// The status sampler behind `/status`, its stream and `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// How often the sampler sweeps every running VM.
    pub interval_ms: u64,
    /// How long one VM's QMP `query-status`, and the bulk stats call (at least 10 s), may take before the
    /// sweep goes on without it.
    pub qmp_timeout_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            qmp_timeout_ms: 2000,
        }
    }
}

/// What the agent does at its start for VMs that should run and do not (a host reboot):
/// it starts them, a few at a time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// The node-wide switch: `false` holds every VM down at start (maintenance).
    pub autostart: bool,
    /// How many starts run at once.
    pub parallel: usize,
    /// Pause between launching one start and the next.
    pub delay_ms: u64,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            autostart: true,
            parallel: 4,
            delay_ms: 2000,
        }
    }
}

/// VMs whose QEMU ends without being asked (crash, OOM killer, killed from outside) are
/// started again, with backoff, a limited number of times.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutorestartConfig {
    pub enabled: bool,
    /// How often libvirt's domain states are read to notice a QEMU that ended.
    pub interval_ms: u64,
    /// At most this many restarts of one VM within `window_s`; then it is left stopped.
    pub max_restarts: u32,
    pub window_s: u64,
    /// Wait before the first restart; doubled for each further one in the window.
    pub backoff_ms: u64,
}

impl Default for AutorestartConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 2000,
            max_restarts: 3,
            window_s: 600,
            backoff_ms: 1000,
        }
    }
}

/// Browser (noVNC) and serial consoles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Where the noVNC client lives (Debian's `novnc` package installs it here).
    pub novnc_dir: PathBuf,
    /// Lifetime of a ticket when the request does not ask for less (at most 300 s).
    pub ticket_ttl_s: u64,
    /// Console sessions open at once across all VMs.
    pub max_sessions: usize,
    /// Console sessions open at once on one VM.
    pub max_sessions_per_vm: usize,
    /// Who may frame the console page: the CSP `frame-ancestors` sources (`'self'`, or the
    /// control panel's origin, e.g. `https://panel.example.com`; `'none'` forbids it).
    pub frame_ancestors: Vec<String>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            novnc_dir: PathBuf::from("/usr/share/novnc"),
            ticket_ttl_s: 60,
            max_sessions: 64,
            max_sessions_per_vm: 2,
            frame_ancestors: vec!["'self'".into()],
        }
    }
}

/// Snapshots of VM disks (internal qcow2 snapshots, see `vm::snapshots`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotsConfig {
    /// Snapshots one VM may hold.
    pub max_per_vm: usize,
    /// A snapshot is refused when the VM storage's free space, minus what the snapshot
    /// will store at once (the guest's memory for `include_ram`), would fall below this.
    pub min_free_gb: u64,
    /// Longest a snapshot job (saving or loading guest memory) may run.
    pub job_timeout_s: u64,
    /// What a VM's snapshots may hold on disk (the data they keep that the disk itself no
    /// longer uses, and saved memory), as a percentage of its `disk_gb`. A snapshot that
    /// would start beyond it is refused (409 `SNAPSHOT_QUOTA_EXCEEDED`).
    pub max_percent_of_disk: u64,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self {
            max_per_vm: 10,
            min_free_gb: 10,
            job_timeout_s: 600,
            max_percent_of_disk: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `hvnode=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
    /// `auto` (plain lines without timestamps under systemd, with them on a terminal),
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "auto".into(),
        }
    }
}

const ENV_PREFIX: &str = "HVNODE_";

impl Config {
    /// Loads defaults, then `path` if given, then environment overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut merged = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let file: toml::Value = toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
            merge(&mut merged, file);
        }
        let overrides = env_overrides(env)?;
        merge(&mut merged, overrides);
        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.boot.parallel == 0 {
            return Err(ConfigError::Invalid(
                "boot.parallel must be at least 1".into(),
            ));
        }
        let ar = &self.autorestart;
        if ar.interval_ms < 100 || ar.window_s == 0 {
            return Err(ConfigError::Invalid(
                "autorestart.interval_ms must be at least 100 and autorestart.window_s at least 1"
                    .into(),
            ));
        }
        let api = &self.api;
        if api.header_timeout_ms < 100 || api.body_timeout_ms < 100 {
            return Err(ConfigError::Invalid(
                "api.header_timeout_ms and api.body_timeout_ms must be at least 100".into(),
            ));
        }
        if api.max_connections == 0
            || api.max_connections_per_peer == 0
            || api.max_connections_per_peer > api.max_connections
        {
            return Err(ConfigError::Invalid(
                "api.max_connections_per_peer must be between 1 and api.max_connections".into(),
            ));
        }
        if !self.storage.qemu_img.is_absolute() {
            return Err(ConfigError::Invalid(
                "storage.qemu_img must be an absolute path (the agent runs it as root; a \
                 name would be looked up in PATH)"
                    .into(),
            ));
        }
        if self.metrics.interval_ms < 100 {
            return Err(ConfigError::Invalid(
                "metrics.interval_ms must be at least 100".into(),
            ));
        }
        if self.snapshots.max_per_vm == 0 || self.snapshots.job_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "snapshots.max_per_vm and snapshots.job_timeout_s must be positive".into(),
            ));
        }
        let console = &self.console;
        if console.max_sessions == 0 || console.max_sessions_per_vm == 0 {
            return Err(ConfigError::Invalid(
                "console.max_sessions and console.max_sessions_per_vm must be at least 1".into(),
            ));
        }
        // Each source goes into a header: one token of visible ASCII, no separators.
        if console.frame_ancestors.is_empty()
            || console.frame_ancestors.iter().any(|s| {
                s.is_empty()
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
            })
        {
            return Err(ConfigError::Invalid(
                "console.frame_ancestors must list CSP sources ('self', 'none' or origins)".into(),
            ));
        }
        if !(1..=300).contains(&self.console.ticket_ttl_s) {
            return Err(ConfigError::Invalid(
                "console.ticket_ttl_s must be between 1 and 300".into(),
            ));
        }
        for hash in &self.api.token_sha256 {
            if !is_sha256_hex(hash) {
                return Err(ConfigError::Invalid(
                    "api.token_sha256 entries must be 64 hex characters (sha256sum of the token)"
                        .into(),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.api.tokens {
            let bad = |what: String| {
                Err(ConfigError::Invalid(format!(
                    "api.tokens {:?}: {what}",
                    t.name
                )))
            };
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return bad("every token needs a name of its own".into());
            }
            if !is_sha256_hex(&t.sha256) {
                return bad("sha256 must be 64 hex characters (sha256sum of the token)".into());
            }
            if t.scopes.is_empty() {
                return bad("scopes must list at least one scope".into());
            }
            if let Some(s) = t
                .scopes
                .iter()
                .find(|s| !TOKEN_SCOPES.contains(&s.as_str()))
            {
                return bad(format!(
                    "unknown scope {s:?} (known: {})",
                    TOKEN_SCOPES.join(", ")
                ));
            }
            if let Some(e) = &t.expires_at {
                if crate::time::parse(e).is_none() {
                    return bad(format!("expires_at {e:?} is not an RFC 3339 time"));
                }
            }
            if let Some(n) = t
                .allowed_ips
                .iter()
                .find(|n| n.parse::<ipnetwork::IpNetwork>().is_err())
            {
                return bad(format!(
                    "allowed_ips entry {n:?} is not an address or CIDR network"
                ));
            }
        }
        check_pool("network.pool", &self.network.pool, true)?;
        if self.tasks.max_concurrent == 0 {
            return Err(ConfigError::Invalid(
                "tasks.max_concurrent must be at least 1".into(),
            ));
        }
        let private = &self.network.private;
        if private.prefix_len < private.pool.prefix() || private.prefix_len > 30 {
            return Err(ConfigError::Invalid(
                "network.private.prefix_len must be between the pool's prefix and 30".into(),
            ));
        }
        if private.vni_first == 0
            || private.vni_first > private.vni_last
            || private.vni_last > 16_777_215
        {
            return Err(ConfigError::Invalid(
                "network.private.vni_first..vni_last must be within 1..=16777215".into(),
            ));
        }
        if !private.underlay.is_empty() && private.local_ip.is_none() {
            return Err(ConfigError::Invalid(
                "network.private.local_ip is required with network.private.underlay".into(),
            ));
        }
        if let Some(p6) = &self.network.pool6 {
            check_pool("network.pool6", p6, false)?;
        }
        let prefix = &self.network.tap_prefix;
        if prefix.len() != 2
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            || prefix == "vb"
            || prefix == "hv"
        {
            return Err(ConfigError::Invalid(
                "network.tap_prefix must be two characters of [a-z0-9], not vb or hv (hvnode's \
                 IFB and private network devices)"
                    .into(),
            ));
        }
        if self.network.bridge.is_empty() || self.network.bridge.len() > 15 {
            return Err(ConfigError::Invalid(
                "network.bridge must be an interface name of 1-15 characters".into(),
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.api.token_sha256 = shown.api.token_sha256.iter().map(|h| masked(h)).collect();
        for t in &mut shown.api.tokens {
            t.sha256 = masked(&t.sha256);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// The base URL clients use to reach this agent.
    pub fn public_url(&self) -> String {
        if self.api.public_url.is_empty() {
            format!("http://{}", self.api.listen)
        } else {
            self.api.public_url.trim_end_matches('/').to_owned()
        }
    }
}

/// A pool's addresses are all of its family and inside its network, `first ≤ last`.
fn check_pool(key: &str, pool: &IpPoolConfig, v4: bool) -> Result<(), ConfigError> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    if pool.cidr.is_ipv4() != v4 {
        return Err(ConfigError::Invalid(format!("{key}.cidr must be {family}")));
    }
    for (name, addr) in [
        ("gateway", pool.gateway),
        ("first", pool.first),
        ("last", pool.last),
    ] {
        if !pool.cidr.contains(addr) {
            return Err(ConfigError::Invalid(format!(
                "{key}.{name} {addr} is outside {key}.cidr {}; set it explicitly",
                pool.cidr
            )));
        }
    }
    if let Some(r) = pool.reserved.iter().find(|a| a.is_ipv4() != v4) {
        return Err(ConfigError::Invalid(format!(
            "{key}: {r} is not an {family} address"
        )));
    }
    // Both ends are of the pool's family (checked above), so `IpAddr`'s order is numeric.
    if pool.first > pool.last {
        return Err(ConfigError::Invalid(format!(
            "{key}.first is after {key}.last"
        )));
    }
    Ok(())
}

/// Refuses a config file that anyone but root (or the agent's own user) could change: it
/// names programs the agent runs as root (`storage.qemu_img`), so whoever can write it
/// owns the host. Refuses one that other users can read when it holds secrets (token
/// hashes let an attacker brute-force weak tokens offline).
pub fn check_file_permissions(path: &Path, config: &Config) -> Result<(), ConfigError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    let uid = meta.uid();
    let me = nix::unistd::geteuid().as_raw();
    if (uid != 0 && uid != me) || mode & 0o022 != 0 {
        return Err(ConfigError::Writable {
            path: path.to_owned(),
            uid,
            mode,
        });
    }
    if (!config.api.token_sha256.is_empty() || !config.api.tokens.is_empty()) && mode & 0o004 != 0 {
        return Err(ConfigError::WorldReadable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A token hash as the config holds it: SHA-256 in 64 hex characters.
fn is_sha256_hex(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A token hash as `hvnode config` shows it: its first 8 characters.
fn masked(h: &str) -> String {
    format!("{}…(masked)", &h[..8.min(h.len())])
}

/// Builds a TOML table from `HVNODE_A__B=v` variables.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<toml::Value, ConfigError> {
    let mut root = toml::value::Table::new();
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    for (key, raw) in vars {
        let path: Vec<String> = key[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Invalid(format!(
                "environment variable {key} has an empty key segment"
            )));
        }
        let value = parse_env_value(&raw);
        let mut table = &mut root;
        for segment in &path[..path.len() - 1] {
            let entry = table
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::value::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "environment variable {key} conflicts with another override"
                    )))
                }
            };
        }
        table.insert(path[path.len() - 1].clone(), value);
    }
    Ok(toml::Value::Table(root))
}

fn parse_env_value(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Wrapper {
        v: toml::Value,
    }
    match toml::from_str::<Wrapper>(&format!("v = {raw}")) {
        Ok(w) => w.v,
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(base), toml::Value::Table(over)) => {
            for (k, v) in over {
                match base.get_mut(&k) {
                    Some(existing @ toml::Value::Table(_)) if v.is_table() => merge(existing, v),
                    _ => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_complete_and_valid() {
        let config = Config::load(None, env(&[])).expect("defaults load");

        assert_eq!(config.api.listen.to_string(), "127.0.0.1:8474");
        assert_eq!(config.api.socket, PathBuf::from("/run/hvnode/hvnode.sock"));
        assert_eq!(config.libvirt.uri, "qemu:///system");
        assert_eq!(config.libvirt.accelerator, Accelerator::Kvm);
        assert_eq!(config.api.max_body_bytes, 1024 * 1024);
        assert_eq!(config.network.bridge, "br-public");
        assert!(config.network.netns.is_empty());
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let config = Config::load(
            None,
            env(&[
                ("HVNODE_API__LISTEN", "0.0.0.0:9000"),
                ("HVNODE_LIBVIRT__ACCELERATOR", "tcg"),
                ("HVNODE_TASKS__MAX_CONCURRENT", "3"),
                ("HVNODE_NETWORK__POOL__GATEWAY", "192.0.2.254"),
                ("HVNODE_CONFIG", "/ignored/without/double/underscore"),
            ]),
        )
        .expect("overrides load");

        assert_eq!(config.api.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.libvirt.accelerator, Accelerator::Tcg);
        assert_eq!(config.tasks.max_concurrent, 3);
        assert_eq!(config.network.pool.gateway.to_string(), "192.0.2.254");
    }

    #[test]
    fn the_sample_config_in_systemd_is_valid() {
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, include_str!("../systemd/config.toml")).unwrap();

        let config = Config::load(Some(&path), env(&[])).unwrap();

        assert_eq!(config.network.pool.gateway.to_string(), "203.0.113.1");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::load(None, env(&[("HVNODE_API__LISTNE", "0.0.0.0:1")])).unwrap_err();

        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn file_values_sit_between_defaults_and_environment() {
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[api]\nlisten = \"127.0.0.1:7000\"\nsocket = \"/tmp/x.sock\"\n",
        )
        .unwrap();

        let config = Config::load(
            Some(&path),
            env(&[("HVNODE_API__LISTEN", "127.0.0.1:7001")]),
        )
        .unwrap();

        assert_eq!(config.api.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(config.api.socket, PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn masked_output_hides_token_hashes() {
        let hash = "a".repeat(64);
        let config = Config::load(
            None,
            env(&[("HVNODE_API__TOKEN_SHA256", &format!("[\"{hash}\"]"))]),
        )
        .unwrap();

        let shown = config.to_masked_toml();

        assert!(!shown.contains(&hash));
        assert!(shown.contains("aaaaaaaa…(masked)"));
    }

    #[test]
    fn malformed_token_hashes_are_rejected() {
        let err = Config::load(None, env(&[("HVNODE_API__TOKEN_SHA256", "[\"secret\"]")]));

        assert!(err.is_err());
    }

    #[test]
    fn pool_addresses_must_sit_inside_the_subnet() {
        let err =
            Config::load(None, env(&[("HVNODE_NETWORK__POOL__GATEWAY", "10.0.0.1")])).unwrap_err();

        assert!(err.to_string().contains("gateway"), "{err}");
    }

    #[test]
    fn an_ipv6_pool_without_its_own_range_is_refused() {
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[network.pool6]\ncidr = \"2001:db8::/64\"\ngateway = \"2001:db8::1\"\n",
        )
        .unwrap();

        let err = Config::load(Some(&path), env(&[])).unwrap_err();

        assert!(err.to_string().contains("network.pool6.first"), "{err}");
    }

    #[test]
    fn an_ipv6_pool_with_its_range_is_accepted() {
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[network.pool6]\ncidr = \"2001:db8::/64\"\ngateway = \"2001:db8::1\"\n\
             first = \"2001:db8::100\"\nlast = \"2001:db8::1ff\"\n",
        )
        .unwrap();

        let config = Config::load(Some(&path), env(&[])).unwrap();

        assert!(config.network.pool6.is_some());
    }

    #[test]
    fn scoped_tokens_are_checked_when_loaded_and_masked_when_shown() {
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        let hash = "c".repeat(64);
        let load = |token: &str| {
            std::fs::write(&path, format!("[[api.tokens]]\n{token}\n")).unwrap();
            Config::load(Some(&path), env(&[]))
        };
        let good = format!(
            "name = \"prom\"\nsha256 = \"{hash}\"\nscopes = [\"metrics\"]\n\
             expires_at = \"2027-01-01T00:00:00Z\"\nallowed_ips = [\"10.0.0.0/8\", \"192.0.2.7\"]"
        );
        let config = load(&good).unwrap();
        assert_eq!(config.api.tokens[0].scopes, ["metrics"]);
        assert!(!config.to_masked_toml().contains(&hash));
        for (bad, why) in [
            (good.replace("metrics", "root"), "unknown scope"),
            (
                good.replace("2027-01-01T00:00:00Z", "next year"),
                "expires_at",
            ),
            (good.replace("10.0.0.0/8", "10.0.0.0/33"), "allowed_ips"),
            (good.replace(&hash, "c1"), "sha256"),
            (good.replace("[\"metrics\"]", "[]"), "at least one scope"),
            (good.replace("\"prom\"", "\"\""), "name"),
        ] {
            let err = load(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        // Two tokens of one name.
        std::fs::write(
            &path,
            format!("[[api.tokens]]\n{good}\n[[api.tokens]]\n{good}\n"),
        )
        .unwrap();
        assert!(Config::load(Some(&path), env(&[])).is_err());
    }

    #[test]
    fn world_readable_config_with_tokens_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!("[api]\ntoken_sha256 = [\"{}\"]\n", "b".repeat(64)),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = Config::load(Some(&path), env(&[])).unwrap();

        let err = check_file_permissions(&path, &config).unwrap_err();

        assert!(matches!(err, ConfigError::WorldReadable { .. }));
    }

    #[test]
    fn a_config_others_can_write_is_refused_whatever_it_holds() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[storage]\nqemu_img = \"/usr/bin/qemu-img\"\n").unwrap();
        let config = Config::load(Some(&path), env(&[])).unwrap();

        for mode in [0o620, 0o602, 0o664] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(
                matches!(
                    check_file_permissions(&path, &config),
                    Err(ConfigError::Writable { .. })
                ),
                "mode {mode:o}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(check_file_permissions(&path, &config).is_ok());
    }

    #[test]
    fn qemu_img_must_be_an_absolute_path() {
        let err = Config::load(None, env(&[("HVNODE_STORAGE__QEMU_IMG", "qemu-img")]))
            .unwrap_err()
            .to_string();

        assert!(err.contains("absolute"), "{err}");
        assert!(Config::load(None, env(&[])).is_ok());
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }
}

//! What a VM is to the platform: requests in, documents out.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::hypervisor::PowerState;
use crate::secret::Secret;
use crate::store::{StepState, TaskRow, TaskState, VmRow, VmRowState};

/// `POST /v1/vms` as sent. Every field is optional here so that a missing one is reported
/// as `MISSING_FIELDS` by `validate::create` rather than as a parse error; numbers are
/// signed so that negatives are `INVALID_RESOURCES`, not `INVALID_JSON`.
///
/// The schema marks the contract's required fields as required and gives their rules, so
/// that a schema-driven client builds valid requests; the agent itself answers a missing
/// one with `MISSING_FIELDS` and a bad one with its own error code.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(
    description = "`POST /v1/vms`. A missing required field is `MISSING_FIELDS`; the \
    fields are then checked in order (`INVALID_HOSTNAME`, `PASSWORD_*`, `INVALID_SSH_KEY`, \
    `INVALID_TEMPLATE`, `INVALID_RESOURCES`, …). The same id with the same body again \
    returns the same task; with another body it is `VPS_EXISTS`."
)]
pub struct CreateVmRequest {
    /// The VPS id (also the libvirt domain UUID), chosen by the control plane.
    #[schema(value_type = String, format = Uuid, required = true)]
    pub id: Option<String>,
    /// An FQDN or a single label: 1–253 characters, labels 1–63 of `a-z`, `0-9` and `-`,
    /// not starting or ending with `-`.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 253,
        pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$",
        example = "web1.example.com")]
    pub hostname: Option<String>,
    #[schema(value_type = TemplateId, required = true)]
    pub template_id: Option<TemplateId>,
    /// At least 1, at most the node's `capacity.max_cpu_cores`.
    #[schema(value_type = i64, required = true, minimum = 1, example = 2)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub cpu_cores: Option<i64>,
    /// Between the node's `capacity.min_ram_mb` and `capacity.max_ram_mb`.
    #[schema(value_type = i64, required = true, minimum = 1, example = 2048)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub ram_mb: Option<i64>,
    /// At least 1 and the template's size, at most the node's `capacity.max_disk_gb`.
    #[schema(value_type = i64, required = true, minimum = 1, example = 20)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub disk_gb: Option<i64>,
    /// 8–72 characters with at least one letter and one digit (the pattern asks for an ASCII
    /// letter; the agent takes any).
    #[schema(value_type = String, format = Password, write_only, required = true,
        min_length = 8, max_length = 72, pattern = "^(.*[A-Za-z].*[0-9].*|.*[0-9].*[A-Za-z].*)$")]
    pub root_password: Option<Secret>,
    /// OpenSSH public keys, one line each (`ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-*`, `sk-*`).
    #[schema(max_items = 32)]
    pub ssh_keys: Option<Vec<String>>,
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub bandwidth_mbps: Option<i64>,
    /// A free address of the node's pool; absent: the next free one.
    pub ip_address: Option<String>,
    /// Where `vps.deployment.completed` / `vps.deployment.failed` are POSTed.
    #[schema(max_length = 2048, pattern = "^https?://[!-\"$-.0->@-~][!-~]*$")]
    pub webhook_url: Option<String>,
    /// Key of the `X-Webhook-Signature` HMAC; at most 1024 bytes.
    #[schema(value_type = Option<String>, format = Password, write_only)]
    pub webhook_secret: Option<Secret>,
    /// Whether the VM comes back by itself after a host reboot (default `true`). Either way
    /// a VM whose QEMU dies is restarted (see `autorestart`).
    pub autostart: Option<bool>,
}

/// `POST /v1/vms/{id}/reinstall`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ReinstallRequest {
    #[schema(value_type = TemplateId, required = true)]
    pub template_id: Option<TemplateId>,
    /// 8–72 characters with at least one letter and one digit (the pattern asks for an ASCII
    /// letter; the agent takes any).
    #[schema(value_type = String, format = Password, write_only, required = true,
        min_length = 8, max_length = 72, pattern = "^(.*[A-Za-z].*[0-9].*|.*[0-9].*[A-Za-z].*)$")]
    pub root_password: Option<Secret>,
    /// Absent: keep the VM's current keys.
    #[schema(max_items = 32)]
    pub ssh_keys: Option<Vec<String>>,
}

/// `POST /v1/vms/{id}/resize`.
///
/// At least one of `cpu_cores`, `ram_mb`, `disk_gb` and `autostart`. Shrinking the disk re-clones it
/// from the template and needs `confirm_data_loss: true` and `erase_confirmation: "ERASE"`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ResizeRequest {
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub cpu_cores: Option<i64>,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub ram_mb: Option<i64>,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "crate::numbers::opt_i64")]
    pub disk_gb: Option<i64>,
    pub confirm_data_loss: Option<bool>,
    /// `"ERASE"` to confirm a shrinking disk.
    pub erase_confirmation: Option<String>,
    /// Restart a running VM now so new CPU and RAM apply at once (default: next boot).
    pub restart: Option<bool>,
    /// Whether the VM comes back by itself after a host reboot (absent: unchanged). May
    /// come alone.
    pub autostart: Option<bool>,
}

/// The answer to an action that runs as a background task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskAccepted {
    pub vps_id: Uuid,
    pub task_id: Uuid,
    pub kind: &'static str,
    pub name: String,
    pub status: VmStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Template ids are strings ("9010") but clients often send numbers (`9010`, even
/// `9010.0`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TemplateId {
    Text(String),
    Number(u64),
}

impl<'de> Deserialize<'de> for TemplateId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TemplateId, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(TemplateId::Text(s)),
            serde_json::Value::Number(n) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && (0.0..9.007e15).contains(f))
                        .map(|f| f as u64)
                })
                .map(TemplateId::Number)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("template_id {n} is not a template id"))
                }),
            _ => Err(serde::de::Error::custom(
                "template_id must be a string or a whole number",
            )),
        }
    }
}

impl TemplateId {
    pub fn into_string(self) -> String {
        match self {
            TemplateId::Text(s) => s,
            TemplateId::Number(n) => n.to_string(),
        }
    }
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: Uuid,
    pub hostname: String,
    pub template_id: String,
    pub cpu_cores: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
    pub root_password: Secret,
    pub ssh_keys: Vec<String>,
    pub bandwidth_mbps: Option<u32>,
    pub ip_address: Option<IpAddr>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<Secret>,
    pub autostart: bool,
}

impl VmSpec {
    /// SHA-256 over everything but the root password (checked against its hash instead), to
    /// tell a repeated create from a conflicting one.
    pub fn digest(&self, resolved_ip: Option<IpAddr>) -> String {
        use sha2::{Digest, Sha256};
        let mut canonical = serde_json::json!({
            "hostname": self.hostname,
            "template_id": self.template_id,
            "cpu_cores": self.cpu_cores,
            "ram_mb": self.ram_mb,
            "disk_gb": self.disk_gb,
            "ssh_keys": self.ssh_keys,
            "bandwidth_mbps": self.bandwidth_mbps,
            "ip_address": resolved_ip,
            "webhook_url": self.webhook_url,
            "webhook_secret": self.webhook_secret.as_ref().map(|s| s.expose()),
        });
        // Only when off: digests of VMs created before the field existed stay the same.
        if !self.autostart {
            canonical["autostart"] = serde_json::Value::Bool(false);
        }
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

/// A VM's status as the platform names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    Deploying,
    Running,
    Stopped,
    Suspended,
    Failed,
    /// libvirt cannot be asked right now, or knows no such domain.
    Unknown,
}

impl VmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Deploying => "deploying",
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
            VmStatus::Suspended => "suspended",
            VmStatus::Failed => "failed",
            VmStatus::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<VmStatus> {
        [
            VmStatus::Deploying,
            VmStatus::Running,
            VmStatus::Stopped,
            VmStatus::Suspended,
            VmStatus::Failed,
            VmStatus::Unknown,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Combines the agent's record with libvirt's power state (`None`: not defined or not
    /// known).
    pub fn derive(record: VmRowState, power: Option<PowerState>) -> VmStatus {
        match record {
            VmRowState::Deploying => VmStatus::Deploying,
            VmRowState::Failed => VmStatus::Failed,
            VmRowState::Active => match power {
                Some(PowerState::Running | PowerState::ShuttingDown) => VmStatus::Running,
                Some(PowerState::Paused | PowerState::PmSuspended) => VmStatus::Suspended,
                Some(PowerState::Shutoff | PowerState::Crashed) => VmStatus::Stopped,
                Some(PowerState::Unknown) | None => VmStatus::Unknown,
            },
        }
    }
}

/// Libvirt domain name of a VM: stable, unique, and obviously ours in `virsh list`.
pub fn domain_name(id: Uuid) -> String {
    format!("vps-{id}")
}

/// Name of the VM's public NIC inside the guest.
pub const PRIMARY_ADAPTER: &str = "eth0";

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmSummary {
    pub id: Uuid,
    pub name: String,
    pub status: VmStatus,
    #[schema(value_type = Option<String>, required = true, example = "203.0.113.10")]
    pub ip_address: Option<IpAddr>,
    pub is_suspended: bool,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl VmSummary {
    pub fn new(vm: &VmRow, status: VmStatus) -> VmSummary {
        VmSummary {
            id: vm.id,
            name: vm.hostname.clone(),
            status,
            ip_address: vm.ip_address,
            is_suspended: status == VmStatus::Suspended,
            created_at: vm.created_at.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Resources {
    pub cpu_cores: u32,
    pub ram_mb: u64,
    pub disk_gb: u64,
    #[schema(required = true)]
    pub bandwidth_mbps: Option<u32>,
}

// The store keeps the same words (`as_str`).
/// `primary`: the address the VPS was created with; `extra`: one added since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpKind {
    Primary,
    Extra,
}

impl IpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IpKind::Primary => "primary",
            IpKind::Extra => "extra",
        }
    }

    /// The kind the store recorded; anything but `primary` is an extra address.
    pub fn from_store(s: &str) -> IpKind {
        if s == IpKind::Primary.as_str() {
            IpKind::Primary
        } else {
            IpKind::Extra
        }
    }
}

/// Where a deployment, or one of its steps, stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Pending,
    InProgress,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpView {
    #[schema(value_type = String, example = "203.0.113.10")]
    pub address: IpAddr,
    #[serde(rename = "type")]
    pub kind: IpKind,
    pub adapter: String,
}

/// A private network membership, as `GET /v1/vms/{id}` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmPrivateNetwork {
    pub network_id: Uuid,
    #[schema(required = true)]
    pub name: Option<String>,
    #[schema(required = true)]
    pub vni: Option<u32>,
    pub membership_id: Uuid,
    #[schema(value_type = String)]
    pub address: IpAddr,
    pub mac: String,
    pub adapter: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VncView {
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmDetail {
    #[serde(flatten)]
    pub summary: VmSummary,
    #[schema(format = DateTime)]
    pub updated_at: String,
    pub resources: Resources,
    pub template_id: String,
    pub ips: Vec<IpView>,
    pub private_networks: Vec<VmPrivateNetwork>,
    pub vnc: VncView,
    pub mac: String,
    /// The power state the control plane last asked for (a guest's own poweroff counts as
    /// a stop); null for a VM the agent has not yet recorded one for.
    #[schema(required = true)]
    pub intended_state: Option<crate::store::power::Intended>,
    /// Whether the VM comes back by itself after a host reboot.
    pub autostart: bool,
    /// Why the VM last stopped; null if it never did.
    #[schema(required = true)]
    pub last_stop_reason: Option<crate::store::power::StopReason>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmList {
    pub instances: Vec<VmSummary>,
    pub pagination: Pagination,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Pagination {
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
    pub has_more: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<VmStatus>,
    pub limit: usize,
    pub offset: usize,
}

/// Answer to a lifecycle action.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActionResult {
    pub id: Uuid,
    pub name: String,
    pub status: VmStatus,
    #[schema(value_type = Option<String>, required = true, example = "203.0.113.10")]
    pub ip_address: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreateAccepted {
    pub vps_id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    pub status: VmStatus,
    #[schema(value_type = Option<String>, required = true, example = "203.0.113.10")]
    pub ip_address: Option<IpAddr>,
    pub deployment_url: String,
    pub estimated_time_seconds: u64,
    pub webhook_configured: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: bool,
    pub vps_id: Uuid,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeploymentStep {
    pub name: String,
    pub status: DeploymentStatus,
    /// 1-based.
    pub order: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccessInfo {
    #[schema(value_type = Option<String>, required = true, example = "203.0.113.10")]
    pub ip_address: Option<IpAddr>,
    pub ssh_port: u16,
    pub ssh_user: &'static str,
}

/// The platform's deployment document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deployment {
    pub vps_id: Uuid,
    pub deployment_status: DeploymentStatus,
    pub vps_status: VmStatus,
    #[schema(required = true)]
    pub current_task: Option<String>,
    #[schema(maximum = 100)]
    pub progress_percent: u32,
    pub tasks: Vec<DeploymentStep>,
    pub tasks_completed: usize,
    pub tasks_total: usize,
    #[schema(required = true, format = DateTime)]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub completed_at: Option<String>,
    pub is_ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_info: Option<AccessInfo>,
    pub task_id: Uuid,
}

impl Deployment {
    pub fn new(vm: &VmRow, status: VmStatus, task: &TaskRow) -> Deployment {
        let tasks: Vec<DeploymentStep> = task
            .steps
            .iter()
            .map(|s| DeploymentStep {
                name: s.name.clone(),
                status: match s.state {
                    StepState::Pending => DeploymentStatus::Pending,
                    StepState::Running => DeploymentStatus::InProgress,
                    StepState::Completed => DeploymentStatus::Completed,
                    StepState::Failed | StepState::RolledBack => DeploymentStatus::Failed,
                },
                order: s.order + 1,
            })
            .collect();
        let completed = task
            .steps
            .iter()
            .filter(|s| s.state == StepState::Completed)
            .count();
        let deployment_status = match task.state {
            TaskState::Pending => DeploymentStatus::Pending,
            TaskState::Running => DeploymentStatus::InProgress,
            TaskState::Completed => DeploymentStatus::Completed,
            TaskState::Failed | TaskState::Cancelled => DeploymentStatus::Failed,
        };
        let is_ready = task.state == TaskState::Completed;
        Deployment {
            vps_id: vm.id,
            deployment_status,
            vps_status: status,
            current_task: task
                .steps
                .iter()
                .find(|s| s.state == StepState::Running)
                .map(|s| s.name.clone()),
            progress_percent: task.progress_percent(),
            tasks_total: tasks.len(),
            tasks,
            tasks_completed: completed,
            started_at: task.started_at.clone().or(Some(task.created_at.clone())),
            completed_at: task.finished_at.clone(),
            is_ready,
            error: task.error.clone(),
            access_info: is_ready.then_some(AccessInfo {
                ip_address: vm.ip_address,
                ssh_port: 22,
                ssh_user: "root",
            }),
            task_id: task.id,
        }
    }
}

/// A task as `GET /v1/tasks` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskView {
    pub id: Uuid,
    pub kind: String,
    pub vps_id: Uuid,
    pub state: TaskState,
    pub steps: Vec<crate::store::StepRow>,
    #[schema(maximum = 100)]
    pub progress_percent: u32,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(required = true, format = DateTime)]
    pub started_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub finished_at: Option<String>,
    #[schema(required = true)]
    pub error: Option<String>,
    #[schema(required = true)]
    pub error_code: Option<String>,
}

impl From<TaskRow> for TaskView {
    fn from(t: TaskRow) -> TaskView {
        TaskView {
            progress_percent: t.progress_percent(),
            id: t.id,
            kind: t.kind,
            vps_id: t.vps_id,
            state: t.state,
            steps: t.steps,
            created_at: t.created_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            error: t.error,
            error_code: t.error_code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_the_record_until_deployed_then_from_libvirt() {
        use PowerState::*;
        assert_eq!(
            VmStatus::derive(VmRowState::Deploying, Some(Running)),
            VmStatus::Deploying
        );
        assert_eq!(VmStatus::derive(VmRowState::Failed, None), VmStatus::Failed);
        assert_eq!(
            VmStatus::derive(VmRowState::Active, Some(Running)),
            VmStatus::Running
        );
        assert_eq!(
            VmStatus::derive(VmRowState::Active, Some(Paused)),
            VmStatus::Suspended
        );
        assert_eq!(
            VmStatus::derive(VmRowState::Active, Some(Shutoff)),
            VmStatus::Stopped
        );
        assert_eq!(
            VmStatus::derive(VmRowState::Active, None),
            VmStatus::Unknown
        );
    }
}

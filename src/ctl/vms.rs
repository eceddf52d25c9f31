//! `hvnode ctl vms|vm|start|stop|restart|deployment`: VMs and their power.

use super::{render, urlencode, Call};

#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// List VMs.
    Vms {
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one VM.
    Vm { id: String },
    /// Start a VM.
    Start { id: String },
    /// Stop a VM (ACPI, then power-off after the timeout).
    Stop {
        id: String,
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Restart a VM.
    Restart { id: String },
    /// Show the deployment progress of a VM.
    Deployment { id: String },
}

impl VmCommand {
    pub(super) fn call(&self) -> Call {
        let (method, path, render): (_, _, fn(&serde_json::Value) -> String) = match self {
            VmCommand::Vms { status } => (
                "GET",
                match status {
                    Some(s) => format!("/v1/vms?limit=100&status={}", urlencode(s)),
                    None => "/v1/vms?limit=100".into(),
                },
                render::render_vms,
            ),
            VmCommand::Vm { id } => (
                "GET",
                format!("/v1/vms/{}", urlencode(id)),
                render::render_fields,
            ),
            VmCommand::Start { id } => (
                "POST",
                format!("/v1/vms/{}/start", urlencode(id)),
                render::render_fields,
            ),
            VmCommand::Stop { id, force, timeout } => (
                "POST",
                format!(
                    "/v1/vms/{}/stop?force={force}&timeout_s={timeout}",
                    urlencode(id)
                ),
                render::render_fields,
            ),
            VmCommand::Restart { id } => (
                "POST",
                format!("/v1/vms/{}/restart", urlencode(id)),
                render::render_fields,
            ),
            VmCommand::Deployment { id } => (
                "GET",
                format!("/v1/vms/{}/deployment", urlencode(id)),
                render::render_fields,
            ),
        };
        Call {
            method,
            path,
            render,
        }
    }
}

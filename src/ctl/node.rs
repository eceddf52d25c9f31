//! `hvnode ctl node|health|tasks`: the node, the agent's health and the task journal.

use super::{render, urlencode, Call};

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Show the node.
    Node,
    /// Show the agent's health.
    Health,
    /// List recent tasks.
    Tasks {
        #[arg(long)]
        vps: Option<String>,
    },
}

impl NodeCommand {
    pub(super) fn call(&self) -> Call {
        let (method, path) = match self {
            NodeCommand::Node => ("GET", "/v1/node".to_owned()),
            NodeCommand::Health => ("GET", "/v1/health".to_owned()),
            NodeCommand::Tasks { vps } => (
                "GET",
                match vps {
                    Some(v) => format!("/v1/tasks?vps_id={}", urlencode(v)),
                    None => "/v1/tasks".into(),
                },
            ),
        };
        Call {
            method,
            path,
            render: render::render_fields,
        }
    }
}

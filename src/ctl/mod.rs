//! `hvnode ctl`: the local admin's client of the agent's Unix socket.
//!
//! It speaks the same API as the control plane (the socket authenticates by peer
//! credentials, so no token is needed), prints tables for people and `--json` for scripts.
//! One file per group of commands (`vms.rs`, `node.rs`); each command says which request
//! it sends and how its answer is shown, and `run` does the rest.

mod client;
mod node;
mod render;
mod vms;

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

pub use client::{Client, CtlError};
pub use render::{render_fields, render_vms, table};

/// Every `hvnode ctl` subcommand, gathered from the groups.
#[derive(clap::Subcommand)]
pub enum Command {
    #[command(flatten)]
    Vms(vms::VmCommand),
    #[command(flatten)]
    Node(node::NodeCommand),
}

/// A command's request, and how its answer is shown.
pub(crate) struct Call {
    pub method: &'static str,
    pub path: String,
    pub render: fn(&Value) -> String,
}

impl Command {
    fn call(&self) -> Call {
        match self {
            Command::Vms(c) => c.call(),
            Command::Node(c) => c.call(),
        }
    }
}

/// Runs one command against the agent at `socket`; prints its answer.
pub async fn run(socket: &Path, json: bool, command: Command) -> ExitCode {
    let call = command.call();
    match Client::new(socket)
        .call(call.method, &call.path, None)
        .await
    {
        Ok(data) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&data).unwrap_or_default()
                );
            } else {
                print!("{}", (call.render)(&data));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hvnode ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A path segment or query value as the URL carries it.
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    fn call(args: &[&str]) -> (String, String) {
        let cli = Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let c = cli.command.call();
        (c.method.to_owned(), c.path)
    }

    #[test]
    fn every_command_sends_its_request() {
        let id = "7d3c3d6e-0000-4000-8000-000000000001";
        let cases: &[(&[&str], &str, String)] = &[
            (&["vms"], "GET", "/v1/vms?limit=100".into()),
            (
                &["vms", "--status", "running"],
                "GET",
                "/v1/vms?limit=100&status=running".into(),
            ),
            (&["vm", id], "GET", format!("/v1/vms/{id}")),
            (&["start", id], "POST", format!("/v1/vms/{id}/start")),
            (
                &["stop", id, "--force", "--timeout", "5"],
                "POST",
                format!("/v1/vms/{id}/stop?force=true&timeout_s=5"),
            ),
            (&["restart", id], "POST", format!("/v1/vms/{id}/restart")),
            (
                &["deployment", id],
                "GET",
                format!("/v1/vms/{id}/deployment"),
            ),
            (&["node"], "GET", "/v1/node".into()),
            (&["health"], "GET", "/v1/health".into()),
            (&["tasks"], "GET", "/v1/tasks".into()),
            (
                &["tasks", "--vps", id],
                "GET",
                format!("/v1/tasks?vps_id={id}"),
            ),
        ];
        for (args, method, path) in cases {
            assert_eq!(call(args), (method.to_string(), path.clone()), "{args:?}");
        }
    }

    #[test]
    fn client_text_cannot_leave_its_path_segment() {
        assert_eq!(call(&["vm", "../node"]).1, "/v1/vms/..%2Fnode");
        assert_eq!(
            call(&["vms", "--status", "a&b=c"]).1,
            "/v1/vms?limit=100&status=a%26b%3Dc"
        );
    }
}

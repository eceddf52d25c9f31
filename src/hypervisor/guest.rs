//! The QEMU guest agent's protocol, in hvnode's terms: is the agent there, run a script,
//! freeze and thaw the filesystems. The operations in `vm/` ask for these and decide what a
//! missing or failing agent means for them; the JSON commands live here only.

use std::time::Duration;

use base64::Engine;
use serde_json::json;
use uuid::Uuid;

use super::{Hypervisor, Result};

/// How a script run through the guest agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptExit {
    pub code: i64,
    /// What the script wrote to stderr, as the guest sent it (untrusted, unbounded).
    pub stderr: String,
}

/// One `guest-ping` round trip, waiting at most `timeout_s` for the answer.
pub async fn ping(hv: &dyn Hypervisor, id: Uuid, timeout_s: i32) -> Result<()> {
    hv.agent_command(id, json!({"execute": "guest-ping"}), timeout_s)
        .await
        .map(|_| ())
}

/// Runs `/bin/sh -c script` in the guest and waits up to `wait` for it to exit. `Ok(None)`
/// when the agent started nothing (no pid in its answer) or the script had not exited
/// (or its status could not be read) by then.
pub async fn run_script(
    hv: &dyn Hypervisor,
    id: Uuid,
    script: &str,
    wait: Duration,
) -> Result<Option<ScriptExit>> {
    let started = hv
        .agent_command(
            id,
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}}),
            10,
        )
        .await?;
    let Some(pid) = started["pid"].as_i64() else {
        return Ok(None);
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = hv
            .agent_command(
                id,
                json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
                10,
            )
            .await;
        match status {
            Ok(v) if v["exited"] == json!(true) => {
                let stderr = v["err-data"]
                    .as_str()
                    .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                return Ok(Some(ScriptExit {
                    code: v["exitcode"].as_i64().unwrap_or(-1),
                    stderr,
                }));
            }
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => return Ok(None),
        }
    }
}

/// Freezes the guest's filesystems (for a consistent disk snapshot).
pub async fn freeze(hv: &dyn Hypervisor, id: Uuid) -> Result<()> {
    hv.agent_command(id, json!({"execute": "guest-fsfreeze-freeze"}), 10)
        .await
        .map(|_| ())
}

/// Thaws what `freeze` froze.
pub async fn thaw(hv: &dyn Hypervisor, id: Uuid) -> Result<()> {
    hv.agent_command(id, json!({"execute": "guest-fsfreeze-thaw"}), 10)
        .await
        .map(|_| ())
}

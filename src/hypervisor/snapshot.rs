//! Internal snapshots of a running VM's disk, through QEMU's monitor.
//!
//! libvirt's own snapshot API cannot be used here: libvirt refuses internal snapshots of
//! domains with UEFI pflash firmware (their NVRAM is a raw file), and external snapshot
//! revert needs libvirt 9.7. So hvnode speaks to QEMU directly, through libvirt's monitor
//! passthrough, and snapshots only the VM's qcow2 disk:
//!
//! - with memory: the `snapshot-save` job writes the guest's RAM and device state into the
//!   disk image together with an internal snapshot of the disk, atomically (the guest is
//!   paused for the duration); `snapshot-load` brings both back.
//! - disk only: `blockdev-snapshot-internal-sync` on the disk's format node, a
//!   crash-consistent point in time (the caller freezes the guest's filesystems around it
//!   when its agent answers).
//!
//! The firmware's variable store (NVRAM) is not part of any snapshot.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use super::{Hypervisor, HypervisorError, Result};

fn failed(message: String) -> HypervisorError {
    HypervisorError::Failed {
        op: "snapshot",
        message,
    }
}

/// The QEMU block node of the disk image at `path` (its qcow2 format node).
pub async fn disk_node(hv: &dyn Hypervisor, id: Uuid, path: &str) -> Result<String> {
    let block = hv.qmp(id, json!({"execute": "query-block"})).await?;
    block
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|dev| dev.get("inserted"))
        .find(|ins| ins["file"].as_str() == Some(path) && ins["drv"] == json!("qcow2"))
        .and_then(|ins| ins["node-name"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| failed(format!("the running domain has no qcow2 disk at {path}")))
}

/// The virtual size QEMU sees for block node `node` (after a live resize or a revert);
/// `None` when no device has that node inserted.
pub async fn virtual_size(hv: &dyn Hypervisor, id: Uuid, node: &str) -> Result<Option<u64>> {
    let block = hv.qmp(id, json!({"execute": "query-block"})).await?;
    Ok(block
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.get("inserted"))
        .find(|i| i["node-name"].as_str() == Some(node))
        .and_then(|i| i["image"]["virtual-size"].as_u64()))
}

/// The internal snapshots the disk node holds, by name.
pub async fn names(hv: &dyn Hypervisor, id: Uuid, node: &str) -> Result<Vec<String>> {
    let nodes = hv
        .qmp(
            id,
            json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        )
        .await?;
    let image = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"].as_str() == Some(node))
        .ok_or_else(|| failed(format!("block node {node} vanished")))?;
    Ok(image["image"]["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect())
}

/// Saves disk and memory as snapshot `name` (the guest pauses while its RAM is written).
pub async fn save_with_memory(
    hv: &dyn Hypervisor,
    id: Uuid,
    node: &str,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let job = job_id("save");
    let cmd = json!({"execute": "snapshot-save", "arguments": {
        "job-id": job, "tag": name, "vmstate": node, "devices": [node]}});
    run_job(hv, id, cmd, &job, timeout).await
}

/// Replaces the guest's memory, devices and disk with snapshot `name`. The domain must be
/// running or paused; QEMU resumes the guest afterwards only if it was running.
pub async fn load(
    hv: &dyn Hypervisor,
    id: Uuid,
    node: &str,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let job = job_id("load");
    let cmd = json!({"execute": "snapshot-load", "arguments": {
        "job-id": job, "tag": name, "vmstate": node, "devices": [node]}});
    run_job(hv, id, cmd, &job, timeout).await
}

/// A disk-only internal snapshot of the running disk.
pub async fn take_disk_only(hv: &dyn Hypervisor, id: Uuid, node: &str, name: &str) -> Result<()> {
    hv.qmp(
        id,
        json!({"execute": "blockdev-snapshot-internal-sync",
               "arguments": {"device": node, "name": name}}),
    )
    .await
    .map(drop)
}

/// Deletes snapshot `name` (with its saved memory, if any) from the running disk; one that
/// is not there is fine.
pub async fn delete(hv: &dyn Hypervisor, id: Uuid, node: &str, name: &str) -> Result<()> {
    if !names(hv, id, node).await?.iter().any(|n| n == name) {
        return Ok(());
    }
    hv.qmp(
        id,
        json!({"execute": "blockdev-snapshot-delete-internal-sync",
               "arguments": {"device": node, "name": name}}),
    )
    .await
    .map(drop)
}

fn job_id(what: &str) -> String {
    format!("hvnode-{what}-{}", Uuid::new_v4().simple())
}

/// Starts a QMP job and waits for it to conclude, then dismisses it.
async fn run_job(
    hv: &dyn Hypervisor,
    id: Uuid,
    cmd: Value,
    job: &str,
    timeout: Duration,
) -> Result<()> {
    hv.qmp(id, cmd).await?;
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        let jobs = hv.qmp(id, json!({"execute": "query-jobs"})).await?;
        let this = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["id"].as_str() == Some(job))
            .cloned()
            .ok_or_else(|| failed(format!("QEMU lost job {job}")))?;
        if this["status"] == json!("concluded") {
            let dismissed = hv
                .qmp(
                    id,
                    json!({"execute": "job-dismiss", "arguments": {"id": job}}),
                )
                .await;
            if let Err(e) = dismissed {
                tracing::warn!(vps = %id, job, error = %e, "cannot dismiss a concluded job");
            }
            return match this["error"].as_str() {
                Some(err) => Err(failed(err.to_owned())),
                None => Ok(()),
            };
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "job {job} still {} after {} s",
                this["status"],
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

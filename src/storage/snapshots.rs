//! Internal snapshots of a stopped VM's disk, through `qemu-img snapshot`, and the storage's
//! free space.
//!
//! These run only while no QEMU has the image open (the VM's claim is held and libvirt
//! reports it shut off); qemu-img's image locking refuses an image in use, so a domain
//! started behind hvnode's back makes the call fail instead of corrupting the disk. A
//! running VM's snapshots go through QEMU itself (`hypervisor::snapshot`).

use std::path::Path;

use uuid::Uuid;

use super::{io_err, path_str, Disks, Result, StorageError};

/// One internal snapshot as the qcow2 image records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSnapshot {
    pub name: String,
    /// Bytes of saved guest memory and device state; 0 for a disk-only snapshot.
    pub vm_state_size: u64,
}

impl Disks {
    /// The image's internal snapshots. Readable while a VM runs (`-U`: no lock taken), so
    /// the listing may be a moment stale then.
    pub async fn image_snapshots(&self, id: Uuid) -> Result<Vec<ImageSnapshot>> {
        let disk = self.disk_path(id);
        let out = self
            .qemu_img_output(&["info", "-U", "--output=json", path_str(&disk)?])
            .await?;
        parse_info(&out).map_err(|reason| StorageError::QemuImg {
            args: "info".into(),
            stderr: reason,
        })
    }

    /// Takes a disk-only snapshot of a stopped VM's disk.
    pub async fn snapshot_offline(&self, id: Uuid, name: &str) -> Result<()> {
        let disk = self.disk_path(id);
        self.qemu_img(&["snapshot", "-q", "-c", name, path_str(&disk)?])
            .await
    }

    /// Reverts a stopped VM's disk to a snapshot.
    pub async fn revert_offline(&self, id: Uuid, name: &str) -> Result<()> {
        let disk = self.disk_path(id);
        self.qemu_img(&["snapshot", "-q", "-a", name, path_str(&disk)?])
            .await
    }

    /// Deletes a snapshot from a stopped VM's disk; one that is not there is fine.
    pub async fn delete_snapshot_offline(&self, id: Uuid, name: &str) -> Result<()> {
        if !self
            .image_snapshots(id)
            .await?
            .iter()
            .any(|s| s.name == name)
        {
            return Ok(());
        }
        let disk = self.disk_path(id);
        self.qemu_img(&["snapshot", "-q", "-d", name, path_str(&disk)?])
            .await
    }

    /// `qemu-img check` of the VM's disk: `Ok(())` when it reports no errors.
    pub async fn check(&self, id: Uuid) -> Result<()> {
        let disk = self.disk_path(id);
        self.qemu_img(&["check", "-q", path_str(&disk)?]).await
    }

    /// Bytes available to the agent on the VM storage's filesystem.
    pub fn free_bytes(&self) -> Result<u64> {
        free_bytes(self.vm_root())
    }
}

pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| io_err("statvfs", path)(std::io::Error::from(e)))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// The snapshot list out of `qemu-img info --output=json`.
fn parse_info(json: &str) -> std::result::Result<Vec<ImageSnapshot>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("unparseable output: {e}"))?;
    let Some(list) = v.get("snapshots") else {
        return Ok(Vec::new());
    };
    let list = list.as_array().ok_or("snapshots is not a list")?;
    list.iter()
        .map(|s| {
            Ok(ImageSnapshot {
                name: s["name"]
                    .as_str()
                    .ok_or("snapshot without a name")?
                    .to_owned(),
                vm_state_size: s["vm-state-size"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_snapshots_from_qemu_img_info() {
        let json = r#"{"virtual-size": 4294967296, "format": "qcow2", "snapshots": [
            {"icount": 0, "vm-clock-nsec": 0, "name": "disk1", "date-sec": 1795436373,
             "date-nsec": 247477000, "vm-clock-sec": 0, "id": "1", "vm-state-size": 0},
            {"name": "ram1", "id": "2", "vm-state-size": 301989888}]}"#;
        assert_eq!(
            parse_info(json).unwrap(),
            [
                ImageSnapshot {
                    name: "disk1".into(),
                    vm_state_size: 0
                },
                ImageSnapshot {
                    name: "ram1".into(),
                    vm_state_size: 301989888
                }
            ]
        );
        assert_eq!(parse_info(r#"{"format": "qcow2"}"#).unwrap(), []);
        assert!(parse_info("not json").is_err());
    }

    #[test]
    fn free_space_of_a_real_filesystem() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
        assert!(free_bytes(Path::new("/does/not/exist")).is_err());
    }
}

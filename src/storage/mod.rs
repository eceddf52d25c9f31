//! Disks: the template image store and each VM's own disk.
//!
//! A template is a read-only image in `storage.image_dir` described by a manifest
//! (`<image_dir>/<anything>.toml`, see `images/README.md`). Before a template is used for the
//! first time its SHA-256 is checked against the manifest; the result is remembered in the
//! store against the file's size and mtime, so a replaced file is checked again.
//!
//! A VM's disk lives in `storage.vm_dir/<uuid>/`: `disk.qcow2` is either a qcow2 overlay
//! backed by the template (linked clone, instant) or a full copy, grown to the plan's size.
//! Files are written under a temporary name and renamed into place, so a disk that exists is
//! complete; that makes every step here safe to repeat after a crash.

mod images;
mod qcow2;
mod snapshots;

use std::path::{Path, PathBuf};

use tokio::process::Command;
use uuid::Uuid;

use crate::config::{CloneMode, StorageConfig};

pub use images::{ImageStore, Template};
pub use qcow2::{backing, virtual_size};
pub use snapshots::{free_bytes, ImageSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("template {0} is not in the image store")]
    UnknownTemplate(String),
    #[error("manifest {path} is invalid: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("template {id} failed its checksum: manifest says {expected}, file has {actual}")]
    ChecksumMismatch {
        id: String,
        expected: String,
        actual: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("qemu-img {args} failed: {stderr}")]
    QemuImg { args: String, stderr: String },
    #[error("disk of {size_gb} GB is smaller than template {template} ({template_gb} GB)")]
    TooSmall {
        size_gb: u64,
        template: String,
        template_gb: u64,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_owned();
    move |source| StorageError::Io { op, path, source }
}

const GIB: u64 = 1024 * 1024 * 1024;

/// The files of each VM.
#[derive(Clone)]
pub struct Disks {
    vm_dir: PathBuf,
    qemu_img: PathBuf,
    clone: CloneMode,
}

impl Disks {
    pub fn new(config: &StorageConfig) -> Disks {
        Disks {
            vm_dir: config.vm_dir.clone(),
            qemu_img: config.qemu_img.clone(),
            clone: config.clone,
        }
    }

    pub fn dir(&self, id: Uuid) -> PathBuf {
        self.vm_dir.join(id.to_string())
    }

    pub fn disk_path(&self, id: Uuid) -> PathBuf {
        self.dir(id).join("disk.qcow2")
    }

    /// The guest's serial console as virtlogd records it (rotated by virtlogd).
    pub fn console_log_path(&self, id: Uuid) -> PathBuf {
        self.dir(id).join("console.log")
    }

    pub fn seed_path(&self, id: Uuid) -> PathBuf {
        self.dir(id).join("seed.img")
    }

    pub fn vm_root(&self) -> &Path {
        &self.vm_dir
    }

    /// Creates the VM's directory, readable by QEMU (which runs as another user).
    pub async fn ensure_dir(&self, id: Uuid) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir(id);
        for d in [&self.vm_dir, &dir] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(io_err("create directory", d))?;
            tokio::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
                .await
                .map_err(io_err("chmod", d))?;
        }
        Ok(dir)
    }

    /// Creates the VM's disk from `template`, `size_gb` large. Does nothing when the disk
    /// already exists (it is only ever renamed into place complete).
    pub async fn create_disk(&self, id: Uuid, template: &Template, size_gb: u64) -> Result<()> {
        let disk = self.disk_path(id);
        if tokio::fs::try_exists(&disk).await.unwrap_or(false) {
            return Ok(());
        }
        if size_gb * GIB < template.virtual_size {
            return Err(StorageError::TooSmall {
                size_gb,
                template: template.id.clone(),
                template_gb: template.virtual_size.div_ceil(GIB),
            });
        }
        self.ensure_dir(id).await?;
        let tmp = disk.with_extension("qcow2.partial");
        let _ = tokio::fs::remove_file(&tmp).await;
        let size = format!("{}", size_gb * GIB);
        let (tmp_s, template_s) = (path_str(&tmp)?, path_str(&template.path)?);
        match self.clone {
            CloneMode::Linked => {
                self.qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    &template.format,
                    "-b",
                    template_s,
                    tmp_s,
                    &size,
                ])
                .await?;
            }
            CloneMode::Full => {
                self.qemu_img(&[
                    "convert",
                    "-q",
                    "-f",
                    &template.format,
                    "-O",
                    "qcow2",
                    template_s,
                    tmp_s,
                ])
                .await?;
                self.qemu_img(&["resize", "-q", tmp_s, &size]).await?;
            }
        }
        // A customer's disk is for the agent and QEMU alone, whatever the umask.
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(io_err("chmod", &tmp))?;
        }
        tokio::fs::rename(&tmp, &disk)
            .await
            .map_err(io_err("rename", &disk))?;
        Ok(())
    }

    /// Grows the VM's disk to `size_gb` (never shrinks).
    pub async fn grow_disk(&self, id: Uuid, size_gb: u64) -> Result<()> {
        let disk = self.disk_path(id);
        let current = virtual_size(&disk).await?;
        if current >= size_gb * GIB {
            return Ok(());
        }
        let size = format!("{}", size_gb * GIB);
        self.qemu_img(&["resize", "-q", path_str(&disk)?, &size])
            .await
    }

    /// Removes everything the VM had on disk. Missing files are fine.
    pub async fn remove_all(&self, id: Uuid) -> Result<()> {
        let dir = self.dir(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &dir)(e)),
        }
    }

    pub async fn remove_disk(&self, id: Uuid) -> Result<()> {
        remove_file_if_exists(&self.disk_path(id)).await
    }

    async fn qemu_img(&self, args: &[&str]) -> Result<()> {
        self.qemu_img_output(args).await.map(drop)
    }

    /// Runs qemu-img and returns its standard output.
    /// What the VM's snapshots hold on disk: the disk file's allocation less the data its
    /// current state uses (`qemu-img map` of the active layer). The difference is the data
    /// only snapshots still reference, their saved memory, and the image's metadata.
    pub async fn snapshot_usage(&self, id: Uuid) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let disk = self.disk_path(id);
        let allocated = tokio::fs::metadata(&disk)
            .await
            .map_err(io_err("stat", &disk))?
            .blocks()
            * 512;
        // -U: the running VM's QEMU holds the image's lock; reading the map is safe.
        let map = self
            .qemu_img_output(&["map", "-U", "--output=json", path_str(&disk)?])
            .await?;
        let own = own_data_bytes(&map).ok_or_else(|| StorageError::QemuImg {
            args: "map".into(),
            stderr: "unparseable map".into(),
        })?;
        Ok(allocated.saturating_sub(own))
    }

    async fn qemu_img_output(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.qemu_img)
            .args(args)
            .output()
            .await
            .map_err(io_err("run", &self.qemu_img))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(StorageError::QemuImg {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

/// Bytes of data the top layer of an image holds itself, from `qemu-img map --output=json`.
fn own_data_bytes(map: &str) -> Option<u64> {
    let extents: Vec<serde_json::Value> = serde_json::from_str(map).ok()?;
    Some(
        extents
            .iter()
            .filter(|e| e["depth"].as_u64() == Some(0) && e["data"].as_bool() == Some(true))
            .filter_map(|e| e["length"].as_u64())
            .sum(),
    )
}

pub async fn remove_file_if_exists(path: &Path) -> Result<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| StorageError::Io {
        op: "use path",
        path: p.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
    })
}

//! The template image store: manifests, and checksum verification before first use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{io_err, virtual_size, Result, StorageError};
use crate::store::Store;

/// A manifest as written in `<image_dir>/*.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    id: String,
    name: String,
    os: String,
    #[serde(default)]
    description: String,
    /// Image file name, relative to the image store.
    file: String,
    #[serde(default = "default_format")]
    format: String,
    sha256: String,
    /// Whether the image runs qemu-guest-agent. Without it, a deployment does not wait for
    /// the agent (readiness is the SSH port alone) and live changes apply at next boot.
    #[serde(default = "default_guest_agent")]
    guest_agent: bool,
}

fn default_guest_agent() -> bool {
    true
}

fn default_format() -> String {
    "qcow2".into()
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub os: String,
    pub description: String,
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(skip)]
    pub format: String,
    pub sha256: String,
    pub size_bytes: u64,
    /// The size the guest sees; a VM disk must be at least this large.
    #[serde(skip)]
    pub virtual_size: u64,
    /// Whether the image runs qemu-guest-agent (the manifest's `guest_agent`, default true).
    pub guest_agent: bool,
}

#[derive(Clone)]
pub struct ImageStore {
    dir: PathBuf,
    store: Store,
    /// Serialises checksum runs so two creates never hash the same image at once.
    verify_lock: Arc<tokio::sync::Mutex<()>>,
}

impl ImageStore {
    pub fn new(dir: &Path, store: Store) -> ImageStore {
        ImageStore {
            dir: dir.to_owned(),
            store,
            verify_lock: Arc::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every template whose manifest parses and whose image exists, sorted by id. Broken
    /// manifests are logged and skipped so one bad file does not hide the others.
    pub async fn templates(&self) -> Result<Vec<Template>> {
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(&self.dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("read", &self.dir)(e)),
        };
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(io_err("read", &self.dir))?
        {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            match self.load(&path).await {
                Ok(t) => out.push(t),
                Err(e) => tracing::warn!(error = %e, "skipping template manifest"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<Template> {
        self.templates()
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| StorageError::UnknownTemplate(id.to_owned()))
    }

    async fn load(&self, path: &Path) -> Result<Template> {
        let bad = |reason: String| StorageError::BadManifest {
            path: path.to_owned(),
            reason,
        };
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(io_err("read", path))?;
        let m: Manifest = toml::from_str(&text).map_err(|e| bad(e.message().to_owned()))?;
        if m.id.is_empty()
            || m.id.len() > 32
            || !m
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(format!("id {:?} must be 1-32 of [A-Za-z0-9_-]", m.id)));
        }
        if m.file.is_empty() || m.file.contains('/') || m.file.starts_with('.') {
            return Err(bad(format!(
                "file {:?} must be a plain file name inside the image store",
                m.file
            )));
        }
        if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("sha256 must be 64 hex characters".into()));
        }
        if !matches!(m.format.as_str(), "qcow2" | "raw") {
            return Err(bad(format!("format {:?} must be qcow2 or raw", m.format)));
        }
        let image = self.dir.join(&m.file);
        let meta = tokio::fs::metadata(&image)
            .await
            .map_err(io_err("stat", &image))?;
        let virtual_size = virtual_size(&image).await?;
        Ok(Template {
            id: m.id,
            name: m.name,
            os: m.os,
            description: m.description,
            path: image,
            format: m.format,
            sha256: m.sha256.to_ascii_lowercase(),
            size_bytes: meta.len(),
            virtual_size,
            guest_agent: m.guest_agent,
        })
    }

    /// Checks the image against its manifest's SHA-256, once per version of the file.
    pub async fn verify(&self, t: &Template) -> Result<()> {
        let _guard = self.verify_lock.lock().await;
        let meta = tokio::fs::metadata(&t.path)
            .await
            .map_err(io_err("stat", &t.path))?;
        let mtime_ns = {
            use std::os::unix::fs::MetadataExt;
            meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
        } as i64;
        let size = meta.len() as i64;
        let (id, path) = (t.id.clone(), t.path.to_string_lossy().into_owned());
        let known: Option<String> = {
            let (id, path) = (id.clone(), path.clone());
            self.store
                .call(move |c| {
                    use rusqlite::OptionalExtension;
                    Ok(c.query_row(
                        "SELECT sha256 FROM template_checks
                         WHERE template_id = ?1 AND path = ?2 AND size = ?3 AND mtime_ns = ?4",
                        rusqlite::params![id, path, size, mtime_ns],
                        |r| r.get(0),
                    )
                    .optional()?)
                })
                .await?
        };
        if known.as_deref() == Some(t.sha256.as_str()) {
            return Ok(());
        }
        let actual = sha256_file(&t.path).await?;
        if actual != t.sha256 {
            return Err(StorageError::ChecksumMismatch {
                id: t.id.clone(),
                expected: t.sha256.clone(),
                actual,
            });
        }
        let now = crate::time::now();
        self.store
            .call(move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO template_checks
                     (template_id, path, size, mtime_ns, sha256, verified_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![id, path, size, mtime_ns, actual, now],
                )?;
                Ok(())
            })
            .await?;
        tracing::info!(template = %t.id, "template checksum verified");
        Ok(())
    }
}

async fn sha256_file(path: &Path) -> Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(|e| StorageError::Io {
        op: "hash",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(files: &[(&str, &[u8])]) -> (ImageStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        (ImageStore::new(dir.path(), crate::store::test_store()), dir)
    }

    fn manifest(id: &str, file: &str, sha: &str) -> String {
        format!(
            "id = \"{id}\"\nname = \"t\"\nos = \"debian\"\nfile = \"{file}\"\nformat = \"raw\"\nsha256 = \"{sha}\"\n"
        )
    }

    #[tokio::test]
    async fn a_matching_checksum_verifies() {
        let sha = hex::encode(Sha256::digest(b"image"));
        let (images, _dir) = store_with(&[
            ("t.img", b"image"),
            ("t.toml", manifest("9010", "t.img", &sha).as_bytes()),
        ]);

        let t = images.get("9010").await.unwrap();

        assert_eq!(t.size_bytes, 5);
        assert!(images.verify(&t).await.is_ok());
    }

    #[tokio::test]
    async fn a_wrong_checksum_is_refused() {
        let (images, _dir) = store_with(&[
            ("t.img", b"image"),
            (
                "t.toml",
                manifest("9010", "t.img", &"0".repeat(64)).as_bytes(),
            ),
        ]);
        let t = images.get("9010").await.unwrap();

        let err = images.verify(&t).await.unwrap_err();

        assert!(matches!(err, StorageError::ChecksumMismatch { .. }));
    }

    #[tokio::test]
    async fn manifests_cannot_point_outside_the_store() {
        let (images, _dir) = store_with(&[(
            "t.toml",
            manifest("9010", "../../etc/shadow", &"0".repeat(64)).as_bytes(),
        )]);

        assert!(images.templates().await.unwrap().is_empty());
        assert!(matches!(
            images.get("9010").await,
            Err(StorageError::UnknownTemplate(_))
        ));
    }
}

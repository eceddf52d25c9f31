//! The NoCloud seed image: a small FAT filesystem labelled `CIDATA` holding `meta-data`,
//! `user-data` and `network-config`, attached to the guest read-only as a virtio disk.
//!
//! It is built in memory (no mkfs, no mtools, no loop device) and renamed into place, so a
//! seed that exists is complete.

use std::io::{Cursor, Write};
use std::path::Path;

use super::{CloudInitError, SeedDocuments};

/// 1 MiB holds the documents with room to spare and formats as FAT12.
const SEED_BYTES: usize = 1024 * 1024;
const LABEL: [u8; 11] = *b"CIDATA     ";

pub fn build(docs: &SeedDocuments) -> Result<Vec<u8>, CloudInitError> {
    let image_err = |e: std::io::Error| CloudInitError::Image(e.to_string());
    let mut image = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(
        &mut image,
        fatfs::FormatVolumeOptions::new().volume_label(LABEL),
    )
    .map_err(image_err)?;
    image.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut image, fatfs::FsOptions::new()).map_err(image_err)?;
        let root = fs.root_dir();
        for (name, body) in docs.files() {
            let mut file = root.create_file(name).map_err(image_err)?;
            file.truncate().map_err(image_err)?;
            file.write_all(body.as_bytes()).map_err(image_err)?;
            file.flush().map_err(image_err)?;
        }
        drop(root);
        fs.unmount().map_err(image_err)?;
    }
    Ok(image.into_inner())
}

/// Writes the seed image to `path` atomically (temporary file, fsync, rename).
pub fn write(path: &Path, docs: &SeedDocuments) -> Result<(), CloudInitError> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = build(docs)?;
    let tmp = path.with_extension("img.partial");
    let io = |op: &'static str| {
        let p = path.to_owned();
        move |source| CloudInitError::Io {
            op,
            path: p,
            source,
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create"))?;
    file.write_all(&bytes).map_err(io("write"))?;
    file.sync_all().map_err(io("sync"))?;
    std::fs::rename(&tmp, path).map_err(io("rename"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_image_is_a_fat_volume_labelled_cidata_with_the_three_documents() {
        let docs = SeedDocuments {
            meta_data: "instance-id: \"i\"\n".into(),
            user_data: "#cloud-config\n".into(),
            network_config: "version: 2\n".into(),
        };

        let bytes = build(&docs).unwrap();

        let mut cursor = Cursor::new(bytes);
        let fs = fatfs::FileSystem::new(&mut cursor, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut text = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "#cloud-config\n");
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["meta-data", "user-data", "network-config"]);
    }
}
